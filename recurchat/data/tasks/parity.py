"""Parity: is the number of 1s in a bit string even or odd? Length 4·(difficulty+1) bits, difficulty 1–8.

    difficulty 1:  "Is the number of 1s in 10110100 even or odd?"  → "even"

An iterative task (a running XOR) whose answer is exact but binary, so chance is 0.5. The shortest level has 8
bits (256 strings) so even it has test prompts after the train/test hash split.
Exercised by `pytest tests/data/tasks/test_task_parity.py`.
"""

from __future__ import annotations

import random
import re

from recurchat.data.tasks.base import Example, require_level

_WORD = re.compile(r"\b(even|odd)\b", re.IGNORECASE)


def n_bits(difficulty: int) -> int:
    return 4 * (difficulty + 1)


class ParityTask:
    name = "parity"
    levels = list(range(1, 9))
    chance = 0.5

    def generate(self, difficulty: int, rng: random.Random) -> Example:
        require_level(self, difficulty)
        bits = "".join(rng.choice("01") for _ in range(n_bits(difficulty)))
        answer = "odd" if bits.count("1") % 2 else "even"
        prompt = f"Is the number of 1s in {bits} even or odd?"
        return Example(prompt=prompt, answer=answer, difficulty=difficulty, task=self.name)

    def extract(self, text: str) -> str | None:
        """The last "even"/"odd" word, lower-cased."""
        matches = _WORD.findall(text)
        return matches[-1].lower() if matches else None

    def check(self, text: str, example: Example) -> bool:
        return self.extract(text) == example.answer
