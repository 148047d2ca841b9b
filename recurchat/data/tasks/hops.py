"""Variable-tracing task: a chain of assignments, 1–8 hops deep; the answer is the last variable's integer value.

    difficulty 2:  "q=3, f=q+4, k=f-2. What is k?"  → "5"

Difficulty d is the number of derived assignments on the asked chain. From difficulty 3 on, the statements are
shuffled and distractor assignments branch off the chain, so the model must trace dependencies rather than read
left to right. Exercised by `pytest tests/data/tasks/test_task_hops.py`.
"""

from __future__ import annotations

import random
import string

from recurchat.data.tasks.base import Example, last_integer, require_level

SHUFFLE_FROM = 3  # below this the chain reads in order: the easiest levels teach the format


class HopsTask:
    name = "hops"
    levels = list(range(1, 9))
    chance = 0.0

    def generate(self, difficulty: int, rng: random.Random) -> Example:
        require_level(self, difficulty)
        n_distractors = (difficulty - 1) // 2 if difficulty >= SHUFFLE_FROM else 0
        names = rng.sample(string.ascii_lowercase, difficulty + 1 + n_distractors)
        chain, distractors = names[: difficulty + 1], names[difficulty + 1 :]
        values = {chain[0]: rng.randint(0, 9)}
        statements = [f"{chain[0]}={values[chain[0]]}"]
        for prev, var in zip(chain, chain[1:]):
            statements.append(self._derive(var, prev, values, rng))
        # A distractor may hang off the chain or another distractor, so it shares names with the real path.
        for var in distractors:
            statements.append(self._derive(var, rng.choice(list(values)), values, rng))
        if difficulty >= SHUFFLE_FROM:
            rng.shuffle(statements)
        prompt = f"{', '.join(statements)}. What is {chain[-1]}?"
        return Example(prompt=prompt, answer=str(values[chain[-1]]), difficulty=difficulty, task=self.name)

    @staticmethod
    def _derive(var: str, source: str, values: dict[str, int], rng: random.Random) -> str:
        delta = rng.randint(1, 9)
        sign = rng.choice("+-")
        values[var] = values[source] + (delta if sign == "+" else -delta)
        return f"{var}={source}{sign}{delta}"

    def extract(self, text: str) -> str | None:
        return last_integer(text)

    def check(self, text: str, example: Example) -> bool:
        return self.extract(text) == example.answer
