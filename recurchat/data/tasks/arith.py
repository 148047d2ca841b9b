"""Multi-digit arithmetic: addition or multiplication of two numbers with `difficulty` (1–6) digits each.

    difficulty 3:  "What is 482*907?"  → "437174"

Exercised by `pytest tests/data/tasks/test_task_arith.py`.
"""

from __future__ import annotations

import random

from recurchat.data.tasks.base import Example, last_integer, require_level


class ArithTask:
    name = "arith"
    levels = list(range(1, 7))
    chance = 0.0

    def generate(self, difficulty: int, rng: random.Random) -> Example:
        require_level(self, difficulty)
        # One-digit operands include 0; longer ones have no leading zero, so "d digits" is literal.
        low = 0 if difficulty == 1 else 10 ** (difficulty - 1)
        a, b = rng.randint(low, 10**difficulty - 1), rng.randint(low, 10**difficulty - 1)
        op = rng.choice("+*")
        answer = a + b if op == "+" else a * b
        return Example(prompt=f"What is {a}{op}{b}?", answer=str(answer), difficulty=difficulty, task=self.name)

    def extract(self, text: str) -> str | None:
        return last_integer(text)

    def check(self, text: str, example: Example) -> bool:
        return self.extract(text) == example.answer
