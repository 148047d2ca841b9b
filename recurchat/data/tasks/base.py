"""The task interface shared by the procedural reasoning tasks, and seeded, disjoint train/test streams.

A task is any object with `name`, `levels` (allowed difficulties), `chance` (accuracy of guessing; ≈0 for
generative answers), `generate(difficulty, rng) -> Example`, `extract(text) -> str | None` (the answer in a model's
output) and `check(text, example) -> bool`. Which split an example belongs to is a pure function of its prompt (a
stable hash), so train and test can never share a prompt whatever seeds are used.
Exercised by `pytest tests/data/tasks/test_task_base.py`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal, Protocol

from recurchat.errors import UserError

SPLITS = ("train", "test")
TEST_BUCKETS = 10  # 1 in TEST_BUCKETS prompts is test-only
# Generous enough for any level whose instance space holds a few hundred prompts; past it the level is too small.
MAX_DRAWS_PER_EXAMPLE = 200

_INTEGER = re.compile(r"-?\d+(?:,\d{3})*(?!\d)")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    difficulty: int
    task: str


class Task(Protocol):
    name: str
    levels: list[int]
    chance: float

    def generate(self, difficulty: int, rng: random.Random) -> Example: ...

    def extract(self, text: str) -> str | None: ...

    def check(self, text: str, example: Example) -> bool: ...


def require_level(task: Task, difficulty: int) -> None:
    """UserError unless `difficulty` is one of the task's levels."""
    if difficulty not in task.levels:
        raise UserError(f"task {task.name!r} has no difficulty {difficulty!r} "
                        f"(levels: {', '.join(str(level) for level in task.levels)})")


def last_integer(text: str) -> str | None:
    """The last integer in `text` in canonical form ("1,234" → "1234", "-0" → "0", "007" → "7"), else None."""
    matches = _INTEGER.findall(text)
    return str(int(matches[-1].replace(",", ""))) if matches else None


def split_of(task_name: str, prompt: str) -> Literal["train", "test"]:
    """The split a prompt belongs to: a stable hash (not Python's salted hash()), so it is the same on every run."""
    digest = hashlib.blake2b(f"{task_name}\n{prompt}".encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_BUCKETS == 0 else "train"


def stream(
    task: Task, split: str, seed: int, n: int, difficulty: int | None = None
) -> list[Example]:
    """`n` examples of `split`, the same for the same arguments; difficulty None takes the levels in turn, so every
    level has n / len(levels) examples (give or take one) and accuracy by difficulty compares like with like.

    Each split draws from its own seeded generator and keeps only the prompts that hash to it. Prompts may repeat
    within a split when a level's instance space is small (training on repeats is harmless).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (expected {' or '.join(SPLITS)})")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if difficulty is not None:
        require_level(task, difficulty)
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across runs and Python versions.
    rng = random.Random(f"{task.name}/{split}/{seed}")
    examples: list[Example] = []
    draws = 0
    while len(examples) < n:
        if draws >= MAX_DRAWS_PER_EXAMPLE * (n + 10):
            raise UserError(f"task {task.name!r}: found only {len(examples)} of {n} {split} examples "
                            f"at difficulty {difficulty} (the level has too few distinct prompts)")
        draws += 1
        level = task.levels[len(examples) % len(task.levels)] if difficulty is None else difficulty
        example = task.generate(level, rng)
        if split_of(task.name, example.prompt) == split:
            examples.append(example)
    return examples


def to_chat(example: Example) -> list[dict]:
    """The example as a two-turn conversation for SFT; the assistant says just the answer."""
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]
