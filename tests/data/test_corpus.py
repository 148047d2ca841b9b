"""Corpus: the embedded default, user-file readers and their errors, the validation split, and prepare_data's
build-then-reuse caches.

Run: `pytest tests/data/test_corpus.py` (add `-m "not slow"` to skip the full embedded-corpus build).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recurchat.data.corpus import (
    EMBEDDED_DESCRIPTION,
    embedded_documents,
    embedded_size,
    prepare_data,
    read_documents,
    split_documents,
)
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError

# ---- embedded corpus -----------------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_and_has_every_source():
    docs = embedded_documents()
    assert docs == embedded_documents()
    assert docs[0].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert any(d.startswith("Revelation 22\n") for d in docs)
    assert any("The \"assert\" statement" in d for d in docs)  # pydoc_data language reference
    assert any(d.startswith("Python module ") for d in docs)  # stdlib docstrings
    # The readers edition keeps the KJV's supplied-word brackets; we strip them, and it has no verse numbers.
    assert "[was]" not in docs[0] and "darkness was upon the face" in docs[0]
    assert not any(d.strip() == "" for d in docs)
    size = embedded_size()
    assert size.docs == len(docs) > 1000
    assert size.bytes >= size.chars > 4_000_000
    assert "Bible" in EMBEDDED_DESCRIPTION and "\n" not in EMBEDDED_DESCRIPTION


# ---- readers -------------------------------------------------------------------------------------------------


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_read_txt_jsonl_parquet_and_directory(tmp_path):
    (tmp_path / "upper.TXT").write_text("upper-case extensions count too", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a whole file is one document\nwith two lines\n", encoding="utf-8")
    # ensure_ascii=False keeps a raw U+2028 inside the JSON string: legal JSON, and not a line break.
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first\u2028line"}, ensure_ascii=False) + "\r\n"
        + json.dumps({"text": "zweite ✓", "id": 2}),
        encoding="utf-8",
    )
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"], "n": [1, 2, 3]}), tmp_path / "c.parquet")

    assert read_documents(tmp_path / "a.txt") == ["a whole file is one document\nwith two lines\n"]
    assert read_documents(tmp_path / "upper.TXT") == ["upper-case extensions count too"]
    assert read_documents(tmp_path / "b.jsonl") == ["first\u2028line", "zweite ✓"]
    assert read_documents(tmp_path / "c.parquet") == ["pq one", "pq two"]

    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    _write_jsonl(shards / "sub" / "2.jsonl", [{"text": "from sub"}])
    _write_jsonl(shards / "1.jsonl", [{"text": "from top"}, {"text": "   "}])  # blank docs are dropped
    (shards / "notes.md").write_text("ignored: not a data extension")
    (shards / ".hidden.txt").write_text("ignored: hidden")
    assert read_documents(shards) == ["from top", "from sub"]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("data.csv", "text\nhello\n", "unsupported data file extension '.csv'"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: malformed JSON line"),
        ("nofield.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"nofield\.jsonl:3: missing field 'text'"),
        ("notstr.jsonl", '{"text": 5}\n', r"notstr\.jsonl:1: field 'text' is int"),
        ("empty.txt", "  \n\n", "empty"),
        ("latin1.txt", b"caf\xe9", "not UTF-8"),
        ("broken.parquet", b"PAR1 definitely not parquet", "not a readable parquet file"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(UserError, match=match) as err:
        read_documents(path)
    assert "\n" not in str(err.value)


def test_missing_path_column_and_empty_dir(tmp_path):
    with pytest.raises(UserError, match="data path not found"):
        read_documents(tmp_path / "nope.txt")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(UserError, match=r"nocol\.parquet: missing column 'text' \(columns: content\)"):
        read_documents(tmp_path / "nocol.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no .txt/.jsonl/.parquet files"):
        read_documents(tmp_path / "empty_dir")


# ---- split ---------------------------------------------------------------------------------------------------


def test_split_many_docs_is_deterministic_disjoint_nonempty():
    docs = [f"document number {i}\n" for i in range(1000)] + ["document number 3\n"]  # one exact duplicate
    train, val = split_documents(docs)
    assert (train, val) == split_documents(docs)
    assert len(val) == 20 and len(train) == 980
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(docs)


def test_split_single_text_holds_out_its_tail_at_a_line_boundary(small_texts):
    text = "".join(small_texts)
    train, val = split_documents([text])
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == text
    assert train[0].endswith("\n")
    assert 0.01 < len(val[0]) / len(text) < 0.04


def test_split_few_docs_and_tiny_inputs():
    train, val = split_documents(["a b c d e f g h i j " * 20, "one line"])
    assert val and train and not set(train) & set(val)
    train, val = split_documents(["x", "y", "z"])  # nothing splittable: the last document is held out
    assert (train, val) == (["x", "y"], ["z"])
    with pytest.raises(UserError, match="too small"):
        split_documents(["x"])
    with pytest.raises(UserError, match="empty"):
        split_documents(["", "  "])


# ---- prepare_data ----------------------------------------------------------------------------------------------


def test_prepare_data_builds_then_reuses_cache(tmp_path, monkeypatch, small_texts):
    monkeypatch.setenv("RECURCHAT_HOME", str(tmp_path / "home"))
    data = tmp_path / "corpus.txt"
    data.write_text("".join(small_texts), encoding="utf-8")

    logs: list[str] = []
    first = prepare_data(str(data), 512, log=logs.append)
    assert first.cache_dir.parent.parent == tmp_path / "home"
    assert first.tokenizer.vocab_size == 512
    assert first.train.dtype == np.uint16 and first.val.dtype == np.uint16
    assert isinstance(first.train, np.memmap)
    assert len(first.val) > 100 and len(first.train) > 20 * len(first.val)
    bos = first.tokenizer.bos_id
    assert first.train[0] == bos and first.val[0] == bos  # each document starts with bos
    text_back = first.tokenizer.decode(first.train[1:].tolist()) + first.tokenizer.decode(first.val[1:].tolist())
    assert text_back == data.read_text(encoding="utf-8")
    assert not any("reusing" in line for line in logs)
    assert sorted(p.name for p in first.cache_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((first.cache_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer_fingerprint"] == first.tokenizer.fingerprint()

    logs.clear()
    second = prepare_data(str(data), 512, log=logs.append)
    assert sum("reusing" in line for line in logs) == 2  # tokenizer and token cache
    assert second.cache_dir == first.cache_dir
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)

    # Editing the file changes its identity: a fresh tokenizer and cache, not stale reuse.
    data.write_text("".join(reversed(small_texts)), encoding="utf-8")
    logs.clear()
    third = prepare_data(str(data), 512, log=logs.append)
    assert third.cache_dir != first.cache_dir and not any("reusing" in line for line in logs)


def test_prepare_data_with_given_tokenizer_and_damaged_cache(tmp_path, small_tokenizer, small_texts):
    data = tmp_path / "docs.jsonl"
    _write_jsonl(data, [{"text": t} for t in small_texts])
    prepared = prepare_data(data, None, home=tmp_path, log=lambda _: None, tokenizer=small_tokenizer)
    assert prepared.tokenizer is small_tokenizer
    assert not (tmp_path / "tokenizers").exists()  # nothing trained
    # small_texts has < 50 documents, so validation is the tail of each one.
    assert int((prepared.val == small_tokenizer.bos_id).sum()) == len(small_texts)

    val = np.array(prepared.val)  # a copy: truncating the file in place would also change the old memmap
    (prepared.cache_dir / "val.bin").write_bytes(b"\x00\x00")  # truncated by a crash or a careless user
    logs: list[str] = []
    rebuilt = prepare_data(data, None, home=tmp_path, log=logs.append, tokenizer=small_tokenizer)
    assert not any("reusing" in line for line in logs)
    assert np.array_equal(rebuilt.val, val)


def test_prepare_data_errors_before_any_work(tmp_path):
    with pytest.raises(UserError, match="data path not found"):
        prepare_data(tmp_path / "missing", 512, home=tmp_path)
    with pytest.raises(UserError, match="minimum"):
        (tmp_path / "x.txt").write_text("some text\n" * 50)
        prepare_data(tmp_path / "x.txt", 100, home=tmp_path, log=lambda _: None)


@pytest.mark.slow
def test_prepare_data_embedded_corpus(tmp_path):
    logs: list[str] = []
    start = time.perf_counter()
    prepared = prepare_data(None, 4096, home=tmp_path, log=logs.append)
    built = time.perf_counter() - start
    assert prepared.tokenizer.vocab_size == 4096
    assert prepared.train.dtype == np.uint16
    assert len(prepared.train) > 1_000_000 and len(prepared.val) > 10_000
    assert built < 30, logs

    logs.clear()
    again = prepare_data(None, 4096, home=tmp_path, log=logs.append)
    assert sum("reusing" in line for line in logs) == 2
    assert again.cache_dir == prepared.cache_dir
    assert isinstance(Tokenizer.from_file(next((tmp_path / "tokenizers").iterdir())), Tokenizer)
