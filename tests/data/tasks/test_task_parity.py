"""The parity task: answers recounted independently, length grows with difficulty, extract/check.

Run: `pytest tests/data/tasks/test_task_parity.py`.
"""

from __future__ import annotations

import random
import re

import pytest

from recurchat.data.tasks.parity import ParityTask, n_bits

TASK = ParityTask()
PROMPT = re.compile(r"^Is the number of 1s in ([01]+) even or odd\?$")


@pytest.mark.parametrize("difficulty", TASK.levels)
def test_answers_are_correct_and_length_follows_difficulty(difficulty):
    rng = random.Random(difficulty)
    answers = set()
    for _ in range(40):
        e = TASK.generate(difficulty, rng)
        bits = PROMPT.match(e.prompt).group(1)
        assert len(bits) == n_bits(difficulty)
        xor = 0
        for bit in bits:
            xor ^= int(bit)
        assert e.answer == ("odd" if xor else "even")
        answers.add(e.answer)
    assert answers == {"even", "odd"}


def test_determinism_and_increasing_length():
    assert TASK.generate(2, random.Random(5)) == TASK.generate(2, random.Random(5))
    lengths = [n_bits(d) for d in TASK.levels]
    assert lengths == sorted(set(lengths)) and lengths[0] >= 8  # ≥ 256 strings, so test prompts exist


def test_extract_and_check():
    e = TASK.generate(1, random.Random(0))
    other = "odd" if e.answer == "even" else "even"
    assert TASK.check(e.answer, e) and TASK.check(f"It is {e.answer.upper()}.", e)
    assert TASK.check(f"{other}? No: {e.answer}", e)
    assert not TASK.check(other, e) and not TASK.check("evenly odder", e)
    assert TASK.extract("no idea") is None and TASK.chance == 0.5
