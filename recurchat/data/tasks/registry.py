"""Name → task instance for the procedural reasoning tasks; `get_task` is what the CLI calls.

Exercised by `pytest tests/data/tasks/test_task_base.py`.
"""

from __future__ import annotations

from recurchat.data.tasks.arith import ArithTask
from recurchat.data.tasks.base import Task
from recurchat.data.tasks.hops import HopsTask
from recurchat.data.tasks.parity import ParityTask
from recurchat.errors import UserError

REGISTRY: dict[str, Task] = {task.name: task for task in (HopsTask(), ArithTask(), ParityTask())}


def get_task(name: str) -> Task:
    """The registered task called `name`; UserError listing the choices otherwise."""
    if name not in REGISTRY:
        raise UserError(f"unknown task {name!r} (choices: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
