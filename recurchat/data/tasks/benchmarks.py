"""Readers for local copies of public benchmarks in their Hugging Face layouts: ARC-Easy/Challenge, MMLU,
HellaSwag (multiple choice → MCQuestion) and GSM8K (generative → GenQuestion with the final number).

Files may be .jsonl, .parquet, .arrow, a `save_to_disk` directory, or a directory of shards (see records.py); the
test split is read when several are present, except HellaSwag, whose public test split has blank labels, so its
validation split is preferred. Field layouts:
  arc-*      allenai/ai2_arc   question, choices {text: [...], label: ["A", ...] or ["1", ...]}, answerKey
  mmlu       cais/mmlu         question, subject, choices [...], answer (int index; a letter is accepted too)
  hellaswag  Rowan/hellaswag   ctx (or ctx_a + ctx_b), endings [...], label ("0".."3" or int), activity_label
  gsm8k      openai/gsm8k      question, answer (worked solution ending in "#### 1,234")

Multiple-choice questions can be scored two ways (the scorer lives in recurchat/eval/tasks.py):
  letter      `mc_prompt(q)` lists the choices as "A. …" lines and ends with "Answer:"; the prediction is the
              argmax of the next-token logits over " A", " B", … (chance = 1/len(choices)). Cheap, one forward,
              but small models rarely learn the format.
  completion  for each choice, the log-likelihood of " " + choice after the question as context (optionally
              normalised by its length in bytes or tokens); the prediction is the best-scoring choice. The usual
              choice for HellaSwag and for small models.
Exercised by `pytest tests/data/tasks/test_task_benchmarks.py`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recurchat.data.tasks.records import DEFAULT_PREFER, read_records
from recurchat.errors import UserError

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: list[str]
    label: int  # index of the correct choice
    task: str
    subject: str = ""  # MMLU's subject, for per-subject breakdowns; empty elsewhere


@dataclass(frozen=True)
class GenQuestion:
    question: str
    answer: str  # the final number, commas stripped
    task: str


def mc_prompt(q: MCQuestion) -> str:
    """The answer-letter formulation: "Question: …\\nA. …\\nB. …\\nAnswer:"."""
    if len(q.choices) > len(LETTERS):
        raise ValueError(f"{len(q.choices)} choices is more than there are letters")
    lines = [f"Question: {q.question}"]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


# ---- field access -------------------------------------------------------------------------------------------
def _str(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise UserError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} is {type(value).__name__}, expected a string")
    return value.strip()


def _str_list(value: object, key: str, where: str, min_len: int = 1) -> list[str]:
    if value is None:
        raise UserError(f"{where}: missing field {key!r}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: field {key!r} must be a list of strings")
    if len(value) < min_len:
        raise UserError(f"{where}: field {key!r} has {len(value)} item(s), expected at least {min_len}")
    return [v.strip() for v in value]


def _index(value: object, n: int, key: str, where: str) -> int:
    """A 0-based answer index from an int, a digit string ("2"), or a letter ("C")."""
    if isinstance(value, bool) or value is None or value == "":
        raise UserError(f"{where}: field {key!r} is {'missing' if value is None else repr(value)}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        value = LETTERS.index(value.strip().upper())
    if not isinstance(value, int) or not 0 <= value < n:
        raise UserError(f"{where}: field {key!r} = {value!r} is not a valid index into {n} choices")
    return value


# ---- per benchmark ------------------------------------------------------------------------------------------
def _arc(record: dict, where: str, task: str) -> MCQuestion:
    choices = record.get("choices")
    if choices is None:
        raise UserError(f"{where}: missing field 'choices'")
    if not isinstance(choices, dict):
        raise UserError(f"{where}: field 'choices' must be an object with 'text' and 'label' lists")
    texts = _str_list(choices.get("text"), "choices.text", where, min_len=2)
    labels = _str_list(choices.get("label"), "choices.label", where, min_len=2)
    if len(texts) != len(labels):
        raise UserError(f"{where}: {len(texts)} choice texts but {len(labels)} choice labels")
    key = record.get("answerKey")
    if key is None:
        raise UserError(f"{where}: missing field 'answerKey'")
    key = str(key).strip()  # some exports store numeric keys as ints
    if key not in labels:
        raise UserError(f"{where}: answerKey {key!r} is not one of the choice labels {', '.join(labels)}")
    return MCQuestion(_str(record, "question", where), texts, labels.index(key), task)


def _mmlu(record: dict, where: str, task: str) -> MCQuestion:
    choices = _str_list(record.get("choices"), "choices", where, min_len=2)
    label = _index(record.get("answer"), len(choices), "answer", where)
    subject = record.get("subject")
    return MCQuestion(_str(record, "question", where), choices, label, task,
                      subject=subject if isinstance(subject, str) else "")


def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry markup like "[title]" and "[step]"; stripped exactly as lm-evaluation-harness does (no
    # final strip: a space it leaves changes the tokens, and the SmolLM2 check in docs/pretrained/ compares the two
    # on the same items), so scores stay comparable to published numbers.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(record: dict, where: str, task: str) -> MCQuestion:
    # ctx_a + capitalised ctx_b, as lm-evaluation-harness builds it (the ctx field leaves ctx_b lower-case).
    if record.get("ctx_a") is not None:
        ctx_b = record.get("ctx_b") or ""
        ctx = f"{_str(record, 'ctx_a', where)} {ctx_b.capitalize() if isinstance(ctx_b, str) else ''}"
    elif record.get("ctx") is not None:
        ctx = _str(record, "ctx", where)
    else:
        raise UserError(f"{where}: missing field 'ctx' (or 'ctx_a' + 'ctx_b')")
    endings = _str_list(record.get("endings"), "endings", where, min_len=2)
    if record.get("label") == "":
        raise UserError(f"{where}: field 'label' is blank (HellaSwag's public test split is unlabeled: "
                        f"use the validation split)")
    label = _index(record.get("label"), len(endings), "label", where)
    activity = record.get("activity_label")
    question = _hellaswag_clean(f"{activity}: {ctx}" if isinstance(activity, str) and activity else ctx)
    return MCQuestion(question, [_hellaswag_clean(e) for e in endings], label, task)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _gsm8k(record: dict, where: str, task: str) -> GenQuestion:
    solution = _str(record, "answer", where)
    if "####" not in solution:
        raise UserError(f"{where}: field 'answer' has no final '#### <number>'")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "").rstrip(".")
    if not _NUMBER.fullmatch(final):
        raise UserError(f"{where}: final answer {final!r} after '####' is not a number")
    return GenQuestion(_str(record, "question", where), final, task)


Converter = Callable[[dict, str, str], "MCQuestion | GenQuestion"]
# name → (converter, split preference when a path holds several splits)
BENCHMARKS: dict[str, tuple[Converter, tuple[str, ...]]] = {
    "arc-easy": (_arc, DEFAULT_PREFER),
    "arc-challenge": (_arc, DEFAULT_PREFER),
    "mmlu": (_mmlu, DEFAULT_PREFER),
    "hellaswag": (_hellaswag, ("validation", "test")),
    "gsm8k": (_gsm8k, DEFAULT_PREFER),
}


def load_benchmark(name: str, path: str | Path) -> list[MCQuestion] | list[GenQuestion]:
    """All questions of benchmark `name` stored at `path`; UserError naming the file and problem otherwise."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r} (choices: {', '.join(BENCHMARKS)})")
    convert, prefer = BENCHMARKS[name]
    questions = [convert(record, where, name) for where, record in read_records(path, prefer)]
    if not questions:
        raise UserError(f"{path}: no {name} questions (the data is empty)")
    return questions
