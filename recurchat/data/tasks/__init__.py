"""Synthetic reasoning tasks (hops, arith, parity, chain) and readers for public benchmark files.

`from recurchat.data.tasks import get_task, stream, to_chat`; benchmarks live in `recurchat.data.tasks.benchmarks`.
Exercised by `pytest tests/data/tasks`.
"""

from recurchat.data.tasks.base import Example, Task, split_of, stream, to_chat
from recurchat.data.tasks.registry import REGISTRY, get_task

__all__ = ["REGISTRY", "Example", "Task", "get_task", "split_of", "stream", "to_chat"]
