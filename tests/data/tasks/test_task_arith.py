"""The arith task: answers recomputed independently, difficulty = digits per operand, extract/check.

Run: `pytest tests/data/tasks/test_task_arith.py`.
"""

from __future__ import annotations

import random
import re

import pytest

from recurchat.data.tasks.arith import ArithTask

TASK = ArithTask()
PROMPT = re.compile(r"^What is (\d+)([+*])(\d+)\?$")


@pytest.mark.parametrize("difficulty", TASK.levels)
def test_answers_are_correct_and_operands_have_difficulty_digits(difficulty):
    rng = random.Random(difficulty)
    ops = set()
    for _ in range(40):
        e = TASK.generate(difficulty, rng)
        a, op, b = PROMPT.match(e.prompt).groups()
        assert len(a) == len(b) == difficulty
        assert difficulty == 1 or (a[0] != "0" and b[0] != "0")
        assert int(e.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        ops.add(op)
    assert ops == {"+", "*"}


def test_determinism_and_difficulty_changes_the_instance():
    assert TASK.generate(4, random.Random(1)) == TASK.generate(4, random.Random(1))
    assert TASK.generate(4, random.Random(1)) != TASK.generate(4, random.Random(2))
    lengths = [len(TASK.generate(d, random.Random(0)).prompt) for d in TASK.levels]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)


def test_extract_and_check():
    e = TASK.generate(6, random.Random(3))
    assert TASK.check(e.answer, e) and TASK.check(f"= {int(e.answer):,}", e)  # thousands separators
    assert not TASK.check(str(int(e.answer) + 1), e) and not TASK.check("", e)
    assert TASK.chance == 0.0
