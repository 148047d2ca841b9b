"""The hops task: answers checked by an independent solver, difficulty = chain length, shuffling and distractors
at higher levels, extract/check on right and wrong outputs.

Run: `pytest tests/data/tasks/test_task_hops.py`.
"""

from __future__ import annotations

import random
import re

import pytest

from recurchat.data.tasks.hops import SHUFFLE_FROM, HopsTask

TASK = HopsTask()
STATEMENT = re.compile(r"^([a-z])=(?:(-?\d+)|([a-z])([+-])(\d+))$")


def parse(prompt: str) -> tuple[dict[str, tuple], str]:
    body, question = prompt.split(". What is ")
    target = question.rstrip("?")
    defs = {}
    for statement in body.split(", "):
        var, const, src, sign, delta = STATEMENT.match(statement).groups()
        assert var not in defs, "each variable is assigned once"
        defs[var] = (int(const),) if const is not None else (src, 1 if sign == "+" else -1, int(delta))
    return defs, target


def solve(prompt: str) -> int:
    defs, target = parse(prompt)
    values: dict[str, int] = {}
    # Fixed-point sweep: order-independent, so it checks shuffled prompts without trusting the generator's order.
    while target not in values:
        progress = False
        for var, d in defs.items():
            if var not in values and (len(d) == 1 or d[0] in values):
                values[var] = d[0] if len(d) == 1 else values[d[0]] + d[1] * d[2]
                progress = True
        assert progress, "the target must be reachable from a constant"
    return values[target]


def hops_to(prompt: str) -> int:
    defs, var = parse(prompt)
    n = 0
    while len(defs[var]) > 1:
        var, n = defs[var][0], n + 1
    return n


@pytest.mark.parametrize("difficulty", TASK.levels)
def test_answers_are_correct_and_depth_is_the_difficulty(difficulty):
    rng = random.Random(difficulty)
    for _ in range(30):
        e = TASK.generate(difficulty, rng)
        assert e.answer == str(solve(e.prompt))
        assert hops_to(e.prompt) == difficulty and e.difficulty == difficulty and e.task == "hops"


def test_generation_is_deterministic_by_rng_seed():
    assert TASK.generate(5, random.Random(9)) == TASK.generate(5, random.Random(9))
    assert TASK.generate(5, random.Random(9)) != TASK.generate(5, random.Random(10))


def test_more_hops_means_more_statements_and_longer_prompts():
    n_statements = [len(parse(TASK.generate(d, random.Random(0)).prompt)[0]) for d in TASK.levels]
    assert n_statements == sorted(n_statements) and len(set(n_statements)) == len(TASK.levels)
    mean_len = [sum(len(TASK.generate(d, random.Random(i)).prompt) for i in range(20)) for d in TASK.levels]
    assert mean_len == sorted(mean_len)


def test_low_levels_read_in_order_high_levels_are_shuffled_with_distractors():
    for d in range(1, SHUFFLE_FROM):
        defs, target = parse(TASK.generate(d, random.Random(1)).prompt)
        assert len(defs) == d + 1 and list(defs)[-1] == target and len(list(defs.values())[0]) == 1
    in_order = 0
    for seed in range(50):
        defs, target = parse(TASK.generate(8, random.Random(seed)).prompt)
        assert len(defs) > 9  # distractors beyond the 9-variable chain
        in_order += list(defs)[-1] == target
    assert in_order < 25


def test_extract_and_check():
    e = TASK.generate(3, random.Random(4))
    assert TASK.check(e.answer, e)
    assert TASK.check(f"Tracing the chain, the value is {e.answer}.", e)
    wrong = str(int(e.answer) + 1)
    assert not TASK.check(wrong, e)
    assert not TASK.check(f"{e.answer}? no, {wrong}", e)  # the last integer counts
    assert not TASK.check("I don't know", e)
    assert TASK.extract("x is -12") == "-12" and TASK.extract("none") is None
