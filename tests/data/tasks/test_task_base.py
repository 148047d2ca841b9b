"""The shared task machinery: registry, seeded train/test streams (deterministic, disjoint), integer extraction,
chat conversion, and bad arguments.

Run: `pytest tests/data/tasks/test_task_base.py`.
"""

from __future__ import annotations

import random

import pytest

from recurchat.data.chat import render_conversation
from recurchat.data.tasks import REGISTRY, Example, get_task, split_of, stream, to_chat
from recurchat.data.tasks.base import last_integer
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["x=1, y=x+2. What is y? 3 Is the number of 1s in 0101 even or odd? even"] * 50, 300)


def test_registry_and_get_task():
    assert set(REGISTRY) == {"hops", "arith", "parity", "chain"}
    for name, task in REGISTRY.items():
        assert get_task(name) is task and task.name == name
        assert task.levels == sorted(task.levels) and task.levels
        assert 0.0 <= task.chance < 1.0
    with pytest.raises(UserError, match=r"unknown task 'nope' \(choices: arith, chain, hops, parity\)"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_stream_is_deterministic_and_seed_dependent(name):
    task = get_task(name)
    a = stream(task, "train", seed=1, n=50)
    assert a == stream(task, "train", seed=1, n=50)
    assert a != stream(task, "train", seed=2, n=50)
    assert stream(task, "test", seed=1, n=20) == stream(task, "test", seed=1, n=20)
    # A longer stream extends a shorter one: n only decides where to stop.
    assert stream(task, "train", seed=1, n=80)[:50] == a
    assert all(isinstance(e, Example) and e.task == name for e in a)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_train_and_test_are_disjoint(name):
    task = get_task(name)
    train = stream(task, "train", seed=0, n=400)
    test = stream(task, "test", seed=0, n=200)
    # Same seed for both on purpose: disjointness must not depend on choosing different seeds.
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert all(split_of(name, e.prompt) == "train" for e in train)
    assert all(split_of(name, e.prompt) == "test" for e in test)
    # Every example is correct by its own task's checker.
    assert all(task.check(e.answer, e) for e in train + test)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fixed_difficulty_and_uniform_levels(name):
    task = get_task(name)
    for level in task.levels:
        assert {e.difficulty for e in stream(task, "test", seed=3, n=10, difficulty=level)} == {level}
    mixed = stream(task, "train", seed=3, n=400)
    counts = {level: sum(e.difficulty == level for e in mixed) for level in task.levels}
    assert min(counts.values()) > 400 / len(task.levels) / 3


def test_split_hash_is_stable_and_about_one_in_ten():
    # A pinned value catches an accidental switch to Python's salted hash().
    prompts = [f"prompt {i}" for i in range(2000)]
    n_test = sum(split_of("hops", p) == "test" for p in prompts)
    assert 120 < n_test < 280
    assert [i for i, p in enumerate(prompts[:100]) if split_of("hops", p) == "test"] == [
        8, 29, 43, 46, 47, 62, 69, 72, 77, 81, 98]


def test_stream_bad_arguments():
    task = get_task("arith")
    with pytest.raises(UserError, match="unknown split 'val'"):
        stream(task, "val", seed=0, n=1)
    with pytest.raises(UserError, match=r"no difficulty 7 \(levels: 1, 2, 3, 4, 5, 6\)"):
        stream(task, "train", seed=0, n=1, difficulty=7)
    with pytest.raises(UserError, match="no difficulty 0"):
        task.generate(0, random.Random(0))
    with pytest.raises(ValueError):
        stream(task, "train", seed=0, n=-1)
    assert stream(task, "test", seed=0, n=0) == []


def test_stream_reports_a_level_too_small_for_its_split():
    class Coin:
        name, levels, chance = "coin", [1], 0.5

        def generate(self, difficulty, rng):
            return Example("heads or tails?", "heads", difficulty, self.name)

    only_split = split_of("coin", "heads or tails?")
    other = "train" if only_split == "test" else "test"
    assert len(stream(Coin(), only_split, seed=0, n=3)) == 3  # repeats are allowed within a split
    with pytest.raises(UserError, match=f"found only 0 of 2 {other} examples"):
        stream(Coin(), other, seed=0, n=2)


@pytest.mark.parametrize(
    "text, expected",
    [("42", "42"), ("The answer is -7.", "-7"), ("1,234,567 apples", "1234567"), ("3 then 5", "5"),
     ("007", "7"), ("-0", "0"), ("no digits here", None), ("", None), ("12,34", "34")],
)
def test_last_integer(text, expected):
    assert last_integer(text) == expected


def test_to_chat_renders_with_answer_as_only_target(tok):
    example = stream(get_task("hops"), "train", seed=0, n=1, difficulty=1)[0]
    conv = to_chat(example)
    assert conv == [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]
    ids, mask = render_conversation(tok, conv)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == example.answer + "<|assistant_end|>"
