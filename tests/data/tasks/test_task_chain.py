"""The chain (pointer-chasing) task: answers checked by an independent resolver, difficulty = hops, every prompt
shuffled with a distractor chain, level ranges that keep train and test disjoint. Run:
`pytest tests/data/tasks/test_task_chain.py`.
"""

from __future__ import annotations

import random
import re

import pytest

from recurchat.data.sft import conversations_for
from recurchat.data.tasks import get_task, split_of, stream
from recurchat.data.tasks.chain import ChainTask
from recurchat.errors import UserError

TASK = ChainTask()
STATEMENT = re.compile(r"^([a-z])=([a-z]|\d)$")


def parse(prompt: str) -> tuple[dict[str, str], str]:
    *statements, question = prompt.split(";")
    defs = {}
    for statement in statements:
        var, value = STATEMENT.match(statement).groups()
        assert var not in defs, "each name is assigned once"
        defs[var] = value
    assert re.fullmatch(r"[a-z]=\?", question), question
    return defs, question[0]


def resolve(prompt: str) -> tuple[str, int]:
    """(the digit the asked name resolves to, hops taken), following aliases one by one."""
    defs, name = parse(prompt)
    hops = 0
    while not defs[name].isdigit():
        name, hops = defs[name], hops + 1
        assert hops <= len(defs), "aliases never loop"
    return defs[name], hops


@pytest.mark.parametrize("difficulty", TASK.levels)
def test_answer_is_the_resolved_digit_after_difficulty_hops(difficulty):
    rng = random.Random(difficulty)
    for _ in range(30):
        e = TASK.generate(difficulty, rng)
        digit, hops = resolve(e.prompt)
        assert e.answer == f"{parse(e.prompt)[1]}={digit}" and hops == difficulty
        assert e.difficulty == difficulty and e.task == "chain"
        assert TASK.check(f"{parse(e.prompt)[1]}={digit}", e) and not TASK.check(f"x={(int(digit) + 1) % 10}", e)


def test_prompts_are_shuffled_and_carry_a_decoy_constant():
    rng = random.Random(0)
    examples = [TASK.generate(6, rng) for _ in range(50)]
    digits = [re.findall(r"=(\d)", e.prompt) for e in examples]
    assert all(len(d) == 2 for d in digits)  # the answer's constant and the distractor chain's
    # the answer's constant is not always the first digit, nor is the asked chain written in order
    assert 0.2 < sum(d[0] == e.answer[-1] for d, e in zip(digits, examples)) / len(examples) < 0.8


def test_every_name_is_one_token_wherever_it_appears():
    from recurchat.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["a=b;c=d;" * 50, "the quick brown fox jumps over the lazy dog. " * 50], 300)
    e = TASK.generate(5, random.Random(3))
    pieces = [tok.decode([i]) for i in tok.encode(e.prompt)]
    names = [p for p in pieces if p.isalpha()]
    assert all(len(p) == 1 for p in names) and len(names) == len(re.findall(r"[a-z]", e.prompt))


def test_level_range_keeps_the_split_and_only_its_levels():
    low = get_task("chain:1-8")
    train = stream(low, "train", seed=0, n=200)
    assert {e.difficulty for e in train} == set(range(1, 9))
    assert all(split_of("chain", e.prompt) == "train" for e in train)
    test = stream(get_task("chain"), "test", seed=0, n=200)
    assert max(e.difficulty for e in test) > 8  # the held-out harder half
    assert not {e.prompt for e in train} & {e.prompt for e in test}


def test_sft_data_takes_a_level_range():
    train, val = conversations_for("builtin:chain:1-4", n_per_task=40, seed=0)
    for conv in train + val:
        assert resolve(conv[0]["content"])[1] <= 4


@pytest.mark.parametrize("spec,message", [("chain:0", "has no levels"), ("chain:x-2", "bad level range"),
                                          ("chains", "unknown task")])
def test_bad_level_ranges_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        get_task(spec)
