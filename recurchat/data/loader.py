"""Batches from a flat token stream: shuffled, rank-sharded, exactly resumable training batches, and
deterministic sequential evaluation windows.

Training: the stream is cut into rows of seq_len+1 tokens (stride seq_len, so targets tile the stream). Epoch e
visits rows in a permutation seeded by (seed, e); each step consumes world_size*batch_size consecutive rows of
it and rank r takes rows [r*B, (r+1)*B). The position is a global row offset, so a run saved on N ranks resumes
on M ranks. Exercised by `pytest tests/data/test_loader.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from recurchat.errors import UserError

STATE_VERSION = 1


class TokenLoader:
    """Infinite (x, y) int64 batches [batch_size, seq_len] for one rank; y is x shifted left by one token."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: batch_size={batch_size} seq_len={seq_len} "
                             f"rank={rank} world_size={world_size}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_rows = world_size * batch_size
        self.n_rows = self._count_rows()
        if self.n_rows < self.global_rows:
            need = self.global_rows * seq_len + 1
            raise UserError(
                f"token stream too short for one batch: need {need:,} tokens "
                f"({world_size} rank(s) x batch {batch_size} x seq_len {seq_len} + 1), have {len(tokens):,}"
            )
        self.epoch = 0
        self.row = 0  # offset into this epoch's permutation of the next global batch
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _count_rows(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def _fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = _gather(self.tokens, rows * self.seq_len, self.seq_len + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank; advances the shared global position by one global batch."""
        # Rows left over at an epoch's end (fewer than one global batch) are skipped; the next permutation
        # reshuffles, so no row is systematically excluded.
        if self.row + self.global_rows > self.n_rows:
            self.epoch += 1
            self.row = 0
        start = self.row + self.rank * self.batch_size
        rows = self._permutation()[start : start + self.batch_size]
        self.row += self.global_rows
        return self._fetch(rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serializable position, in global (rank-independent) terms."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "row": self.row,
            "seq_len": self.seq_len,
            "n_rows": self.n_rows,
            "global_batch_rows": self.global_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off; rank count may differ if the global batch is the same."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"unsupported data-loader state version {state.get('version')!r}")
        if state["seq_len"] != self.seq_len:
            raise UserError(f"cannot resume: checkpoint used seq_len {state['seq_len']}, now {self.seq_len}")
        if state["n_rows"] != self.n_rows:
            raise UserError(f"cannot resume: training data changed ({state['n_rows']:,} rows of "
                            f"{self.seq_len + 1} tokens in the checkpoint, {self.n_rows:,} now)")
        if state["global_batch_rows"] != self.global_rows:
            raise UserError(
                f"cannot resume: checkpoint's global batch is {state['global_batch_rows']} rows, now "
                f"{self.global_rows} ({self.world_size} rank(s) x batch {self.batch_size}); keep "
                f"world_size x batch_size the same"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.row = int(state["row"])


class RowLoader(TokenLoader):
    """The same shuffling, rank sharding and exact resume over pre-built (x, y) rows (SFT conversations)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.x, self.y = x, y
        if x.size(0) < world_size * batch_size:
            raise UserError(f"only {x.size(0)} training conversations; one step needs {world_size * batch_size} "
                            f"({world_size} rank(s) x batch {batch_size})")
        super().__init__(np.empty(0, dtype=np.uint16), batch_size, x.size(1), seed, rank, world_size)

    def _count_rows(self) -> int:
        return self.x.size(0)

    def _fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rows)
        return self.x[index], self.y[index]


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping windows from the stream's start whose targets cover exactly
    min(max_tokens, len(tokens) - 1) tokens, each once.

    Full windows come batch_size at a time (the last batch may have fewer rows); a remainder shorter than
    seq_len comes last as a [1, remainder] batch, so small validation sets are still fully scored.
    """
    if len(tokens) < 2:
        raise UserError(f"evaluation token stream too short: {len(tokens)} token(s), need at least 2")
    n_targets = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens) - 1)
    n_full, remainder = divmod(n_targets, seq_len)
    for first in range(0, n_full, batch_size):
        count = min(batch_size, n_full - first)
        starts = np.arange(first, first + count, dtype=np.int64) * seq_len
        windows = _gather(tokens, starts, seq_len + 1)
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if remainder:
        start = n_full * seq_len
        window = torch.from_numpy(np.asarray(tokens[start : start + remainder + 1], dtype=np.int64))[None]
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()


def eval_batch_count(n_tokens: int, batch_size: int, seq_len: int, max_tokens: int | None = None) -> int:
    """How many batches eval_batches yields (for progress bars)."""
    n_targets = max(0, n_tokens - 1) if max_tokens is None else min(max_tokens, max(0, n_tokens - 1))
    n_full, remainder = divmod(n_targets, seq_len)
    return math.ceil(n_full / batch_size) + (1 if remainder else 0)


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    # One fancy-index read per batch; memmap pages are touched only for the rows used.
    index = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


class ProbeLoader:
    """Fresh labelled-sequence batches (data/tasks/probes.py) for one rank, generated from (seed, batch index,
    rank): nothing to store, exactly resumable from the batch count alone. next_batch returns (x, y, difficulty,
    hints), hints None unless asked for (`hints`) and the probe has intermediate targets (data/tasks/probes.py)."""

    def __init__(self, probe, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 hints: bool = False) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.probe, self.batch_size, self.seed, self.hints = probe, batch_size, seed, hints
        self.rank, self.world_size, self.global_rows = rank, world_size, world_size * batch_size
        self.batches = 0  # global batches drawn so far

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        seed = ((self.seed * 1_000_003 + self.batches) * 1_009 + self.rank) % (2**62)
        self.batches += 1
        batch = self.probe.batch(self.batch_size, seed, self.hints)
        return batch.x, batch.y, batch.difficulty, batch.hints

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "probe": self.probe.name, "seed": self.seed, "batches": self.batches,
                "global_batch_rows": self.global_rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("probe") != self.probe.name:
            raise UserError(f"cannot resume: the checkpoint's data is {state.get('probe', 'not a probe')!r}, "
                            f"now {self.probe.name!r}")
        if state["global_batch_rows"] != self.global_rows:
            raise UserError(f"cannot resume: checkpoint's global batch is {state['global_batch_rows']} rows, now "
                            f"{self.global_rows}; keep world_size x batch_size the same")
        self.seed, self.batches = int(state["seed"]), int(state["batches"])
