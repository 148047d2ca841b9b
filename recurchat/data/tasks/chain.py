"""Pointer chasing: a shuffled list of aliases and constants; the reply names the asked variable and its digit.

    difficulty 3:  "t=5;p=w;w=c;q=t;c=8;x=p;x=?"  → "x=8"    (x → p → w → c, three hops)

Difficulty d is the number of alias hops from the asked name to its constant. Nothing but following pointers is
needed (no arithmetic), so the work grows with d alone: a model that runs more iterations can, in principle, follow
more hops. Every prompt is shuffled, and a distractor chain with its own constant (about d/2 hops) plus aliases that
branch off the asked chain share the names, so reading left to right or taking the first digit does not work.
The format is chosen for the tokenizer: no spaces, so a name is the same single token wherever it appears (with
", x" a name would be " x" on the left and "x" on the right, or split in two); and the reply repeats the name, so
the digit is predicted right after "x=", where the first hop is the copy an induction head already does in text.
Levels 1..16: train on 1..D and test on 1..2D with `builtin:chain:1-8` (SFT) and `--tasks chain` (eval).
Exercised by `pytest tests/data/tasks/test_task_chain.py`.
"""

from __future__ import annotations

import random
import string

from recurchat.data.tasks.base import Example, last_integer, require_level

MAX_NAMES = len(string.ascii_lowercase)


class ChainTask:
    name = "chain"
    levels = list(range(1, 17))
    chance = 0.1  # the answer is one digit

    def generate(self, difficulty: int, rng: random.Random) -> Example:
        require_level(self, difficulty)
        distractor_hops = max(1, difficulty // 2)
        branches = min(max(1, difficulty // 3), MAX_NAMES - (difficulty + 1) - (distractor_hops + 1))
        names = rng.sample(string.ascii_lowercase, difficulty + 1 + distractor_hops + 1 + branches)
        chain = names[: difficulty + 1]  # chain[0] holds the constant, chain[-1] is asked
        other = names[difficulty + 1: difficulty + 2 + distractor_hops]
        answer, decoy = rng.sample(range(10), 2)
        statements = [f"{chain[0]}={answer}", f"{other[0]}={decoy}"]
        statements += [f"{b}={a}" for a, b in zip(chain, chain[1:])]
        statements += [f"{b}={a}" for a, b in zip(other, other[1:])]
        # aliases of names on the asked chain (never asked themselves): same targets, different paths
        statements += [f"{name}={rng.choice(chain[:-1])}" for name in names[difficulty + 2 + distractor_hops:]]
        rng.shuffle(statements)
        prompt = ";".join(statements + [f"{chain[-1]}=?"])
        return Example(prompt=prompt, answer=f"{chain[-1]}={answer}", difficulty=difficulty, task=self.name)

    def extract(self, text: str) -> str | None:
        return last_integer(text)

    def check(self, text: str, example: Example) -> bool:
        return self.extract(text) == self.extract(example.answer)
