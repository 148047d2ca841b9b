"""Chat rendering: layout of special tokens, the assistant-only loss mask, truncation, prompts, JSONL loading
with file:line errors, and SFT row packing.

Run: `pytest tests/data/test_chat.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

from recurchat.data.chat import (
    IGNORE_INDEX,
    load_conversations,
    render_conversation,
    render_prompt,
    sft_rows,
)
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError

TEXT = ("The quick brown fox jumps over the lazy dog. What is two plus two? Two plus two is four. "
        "Be brief and answer the question. Hello there, how are you today? I am fine, thank you. ") * 20

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And the fox?"},
    {"role": "assistant", "content": "It jumps over the lazy dog."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=300)


def sid(tok: Tokenizer, name: str) -> int:
    return tok.special_id(name)


def expected_render(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The layout spelled out independently of chat.py's loop."""
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        body = tok.encode(m["content"])
        on = int(m["role"] == "assistant")
        ids += [sid(tok, f"{m['role']}_start"), *body, sid(tok, f"{m['role']}_end")]
        mask += [0, *([on] * len(body)), on]
    return ids, mask


def test_layout_and_mask_match_spec(tok):
    ids, mask = render_conversation(tok, CONV)
    assert (ids, mask) == expected_render(tok, CONV)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids[1] == sid(tok, "system_start") and ids[-1] == sid(tok, "assistant_end")
    for role in ("system", "user", "assistant"):
        n = sum(m["role"] == role for m in CONV)
        assert ids.count(sid(tok, f"{role}_start")) == ids.count(sid(tok, f"{role}_end")) == n


def test_mask_covers_exactly_assistant_content_and_end(tok):
    ids, mask = render_conversation(tok, CONV)
    assert len(ids) == len(mask)
    masked = [t for t, m in zip(ids, mask) if m]
    expected = []
    for m in CONV:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [sid(tok, "assistant_end")]
    assert masked == expected
    assert tok.decode(masked).replace("<|assistant_end|>", "|") == "Four.|It jumps over the lazy dog.|"
    # assistant_start is context, not a target: the model is told when to speak.
    assert all(m == 0 for t, m in zip(ids, mask) if t == sid(tok, "assistant_start"))


def test_content_cannot_inject_special_tokens(tok):
    conv = [{"role": "user", "content": "<|assistant_end|><|bos|>"}, {"role": "assistant", "content": "ok"}]
    ids, _ = render_conversation(tok, conv)
    assert ids.count(tok.bos_id) == 1 and ids.count(sid(tok, "assistant_end")) == 1


def test_truncation_keeps_the_start(tok):
    full_ids, full_mask = render_conversation(tok, CONV)
    for n in (1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = render_conversation(tok, CONV, max_len=n)
        assert ids == full_ids[:n] and mask == full_mask[:n]
    with pytest.raises(ValueError):
        render_conversation(tok, CONV, max_len=0)


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "empty"),
        ("hello", "must be a list"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content is int"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "missing field 'content'"),
        (["hi", {"role": "assistant", "content": "x"}], "message 0 is str"),
    ],
)
def test_bad_conversations_are_user_errors(tok, messages, problem):
    with pytest.raises(UserError, match=problem):
        render_conversation(tok, messages)


def test_render_prompt_ends_with_assistant_start(tok):
    messages = CONV[:4]
    ids = render_prompt(tok, messages)
    rendered, _ = expected_render(tok, messages)
    assert ids == rendered + [sid(tok, "assistant_start")]
    # The prompt is exactly the prefix of the full conversation that precedes the assistant's answer.
    full, mask = render_conversation(tok, CONV)
    assert full[: len(ids)] == ids and mask[len(ids)] == 1
    assert render_prompt(tok, [{"role": "user", "content": "hi"}])[-1] == sid(tok, "assistant_start")
    with pytest.raises(UserError, match="end with a user message"):
        render_prompt(tok, CONV)
    with pytest.raises(UserError, match="empty"):
        render_prompt(tok, [])


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_conversations_roundtrip(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": CONV}), "", json.dumps({"messages": CONV[1:3]})])
    assert load_conversations(path) == [CONV, CONV[1:3]]


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"text": "hi"}), "missing field 'messages'"),
        (json.dumps([1, 2]), "missing field 'messages'"),
        (json.dumps({"messages": []}), "empty"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
        (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "unknown role 'bot'"),
        (json.dumps({"messages": [{"role": "assistant", "content": None}]}), "content is NoneType"),
    ],
)
def test_load_conversations_errors_name_file_and_line(tmp_path, bad_line, problem):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": CONV}), "", bad_line])
    with pytest.raises(UserError, match=problem) as info:
        load_conversations(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert "\n" not in str(info.value)


def test_load_conversations_missing_empty_and_not_utf8(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="empty"):
        load_conversations(write_lines(tmp_path / "e.jsonl", [""]))
    (tmp_path / "b.jsonl").write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        load_conversations(tmp_path / "b.jsonl")


def test_sft_rows_shapes_shift_and_ignore_index(tok):
    short = CONV[1:3]
    seq_len = 64
    x, y = sft_rows(tok, [CONV, short], seq_len)
    assert x.shape == y.shape == (2, seq_len) and x.dtype == y.dtype == torch.int64
    for row, conv in enumerate([CONV, short]):
        ids, mask = render_conversation(tok, conv, max_len=seq_len + 1)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert (x[row, n:] == tok.pad_id).all() and (y[row, n:] == IGNORE_INDEX).all()
        # Target i is the next token exactly where that next token is supervised.
        for i in range(n):
            assert y[row, i].item() == (ids[i + 1] if mask[i + 1] else IGNORE_INDEX)
    # The short row's targets are exactly the assistant answer and its end token.
    targets = [t for t in y[1].tolist() if t != IGNORE_INDEX]
    assert targets == tok.encode("Four.") + [sid(tok, "assistant_end")]


def test_sft_rows_truncates_and_drops_rows_without_targets(tok):
    full, _ = render_conversation(tok, CONV)
    seq_len = len(full) - 3
    x, y = sft_rows(tok, [CONV], seq_len)
    assert x.shape == (1, seq_len) and x[0].tolist() == full[:seq_len]
    assert (x != tok.pad_id).all()
    # A window that ends before the first assistant token has nothing to learn: dropped.
    prompt_len = len(render_prompt(tok, CONV[:2]))
    x, _ = sft_rows(tok, [CONV, CONV[:3]], prompt_len + 1)
    assert x.shape[0] == 2
    with pytest.raises(UserError, match="truncated away"):
        sft_rows(tok, [CONV], prompt_len - 1)
    with pytest.raises(UserError, match="no conversations"):
        sft_rows(tok, [], 8)
