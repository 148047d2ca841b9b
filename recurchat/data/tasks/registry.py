"""Name → task instance for the procedural reasoning tasks; `get_task` is what the CLI calls.

Exercised by `pytest tests/data/tasks/test_task_base.py`.
"""

from __future__ import annotations

import random

from recurchat.data.tasks.arith import ArithTask
from recurchat.data.tasks.base import Example, Task, require_level
from recurchat.data.tasks.chain import ChainTask
from recurchat.data.tasks.hops import HopsTask
from recurchat.data.tasks.parity import ParityTask
from recurchat.errors import UserError

REGISTRY: dict[str, Task] = {task.name: task for task in (HopsTask(), ArithTask(), ParityTask(), ChainTask())}


class LevelRange:
    """A task restricted to some of its levels. It keeps the task's name, so its prompts fall in the same train/test
    split: training on chain:1-8 and testing on chain (1..16) never shares a prompt."""

    def __init__(self, task: Task, levels: list[int]):
        self.task, self.name, self.levels, self.chance = task, task.name, levels, task.chance

    def generate(self, difficulty: int, rng: random.Random) -> Example:
        require_level(self, difficulty)
        return self.task.generate(difficulty, rng)

    def extract(self, text: str) -> str | None:
        return self.task.extract(text)

    def check(self, text: str, example: Example) -> bool:
        return self.task.check(text, example)


def parse_levels(task: Task, text: str) -> list[int]:
    """"3" or "1-8" → the task's levels in that range; UserError when it names none or is malformed."""
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"task {task.name!r}: bad level range {text!r} (expected N or LO-HI)") from None
    levels = [level for level in task.levels if lo_i <= level <= hi_i]
    if not levels:
        raise UserError(f"task {task.name!r} has no levels in {text!r} (levels: {task.levels[0]}..{task.levels[-1]})")
    return levels


def get_task(spec: str) -> Task:
    """The registered task `NAME`, or `NAME:LO-HI` for some of its levels; UserError listing the choices otherwise."""
    name, sep, levels = spec.partition(":")
    if name not in REGISTRY:
        raise UserError(f"unknown task {name!r} (choices: {', '.join(sorted(REGISTRY))})")
    return LevelRange(REGISTRY[name], parse_levels(REGISTRY[name], levels)) if sep else REGISTRY[name]
