"""Step-level (continuous) batching over a pool of KV-cache rows: sequences join between decode steps and leave the
moment they finish, each with its own position, sampling settings and depth plan.

    recurchat serve --ckpt runs/tiny --batching continuous      (the default; `Engine.stream` runs on this too)

One `step()`:
  1. decode: one token for every sequence that sampled one last step — a single runner pass in which each row runs
     its own plan (fixed r, exit criterion, minimum and cap) and leaves the iteration loop at its own depth;
  2. prefill: every newly added sequence writes its prompt into its row — up to `prefill_chunk` tokens per step, so
     a long prompt costs the others at most one chunk of latency per step; prompts that start together and fit in
     a chunk go in one padded pass per prefill depth;
  3. sample: every sequence with fresh logits draws its token with its own generator, and those that hit a stop
     token, max_tokens, the context or a cancellation finish and free their row for the next sequence.
The pool is one KVCache allocated once (`capacity` rows × `max_len` positions × the iteration slots of `depth`)
and reused: a freed row is overwritten by the next sequence's prefill, and the attention mask never lets a row
read past its own position, so nothing needs clearing. Exercised by `pytest tests/infer/test_batcher.py`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from recurchat.infer.kv_cache import KVCache
from recurchat.infer.plan import DepthPlan, RowPlans
from recurchat.infer.sampling import SamplingParams, finish_reason, sample_next

if TYPE_CHECKING:  # a batch runs on the model runner's passes
    from recurchat.infer.runner import Runner


@dataclass
class Event:
    row: int
    token: int
    depth: int
    finish_reason: str | None = None  # "stop" | "length" when this was the row's last event


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def mean_depth(self) -> float:
        return sum(self.depths) / len(self.depths) if self.depths else 0.0


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A sequence's own generator: its seed, or a fresh one from the OS (the process-wide RNG is never reseeded)."""
    return torch.Generator(device=device).manual_seed(seed if seed is not None else secrets.randbits(63))



@dataclass(eq=False)
class Sequence:
    """One generation in the pool: what it asked for, and where it stands."""

    id: int  # the Event.row of its tokens
    prompt: list[int]
    params: SamplingParams
    plan: DepthPlan
    generator: torch.Generator
    warm_start: bool = False
    row: int = -1  # its KV-cache row, once admitted
    cached: int = 0  # prompt tokens already in the cache
    pos: int = 0  # position of the token to feed next
    produced: int = 0
    logits: torch.Tensor | None = None  # next-token logits, when ready to sample
    depth: int = 0  # the depth those logits came from
    state: torch.Tensor | None = None  # final recurrent state of the last token (warm start)
    token: int | None = None  # sampled and going on: fed at the next decode
    finish_reason: str | None = field(default=None, init=False)


class ContinuousBatch:
    def __init__(self, runner: Runner, capacity: int, max_len: int, kv: str, depth: int, prefill_chunk: int = 256):
        self.runner, self.kv, self.depth, self.max_len = runner, kv, depth, max_len
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache(runner.cfg, kv, capacity, max_len, depth, runner.device, runner.dtype.torch_dtype)
        self.free = list(range(capacity - 1, -1, -1))
        self.sequences: list[Sequence] = []
        self.last_plans: tuple[list[DepthPlan], RowPlans] | None = None  # row_plans' last answer and its plans

    @property
    def capacity(self) -> int:
        return self.cache.batch_size

    @property
    def busy(self) -> bool:
        return bool(self.sequences)

    def fits(self, seq: Sequence) -> bool:
        """A free row, a prompt that fits the pool's positions, a plan within its iteration slots."""
        return bool(self.free) and len(seq.prompt) < self.max_len and seq.plan.depth <= self.depth

    def add(self, seq: Sequence) -> None:
        if not self.fits(seq):
            raise ValueError(f"sequence {seq.id} does not fit this pool")
        seq.row = self.free.pop()
        self.sequences.append(seq)

    @torch.no_grad()
    def step(self, cancelled: Callable[[Sequence], bool] | None = None) -> list[Event]:
        """Decode, prefill, sample (see the module doc); the events of the tokens decided in this step."""
        with self.runner.autocast():
            self._decode([s for s in self.sequences if s.token is not None])
            self._prefill([s for s in self.sequences if s.cached < len(s.prompt)])
            return self._sample([s for s in self.sequences if s.logits is not None], cancelled)

    def _decode(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        dev = self.runner.device
        rows = torch.tensor([s.row for s in seqs], device=dev)
        pos = torch.tensor([s.pos for s in seqs], device=dev)
        tok = torch.tensor([s.token for s in seqs], device=dev)
        warm = warm_rows = None
        if any(s.warm_start and s.state is not None for s in seqs):
            warm_rows = torch.tensor([s.warm_start and s.state is not None for s in seqs], device=dev)
            blank = torch.zeros(1, self.runner.cfg.d_model, device=dev)
            warm = torch.stack([s.state if s.warm_start and s.state is not None else blank for s in seqs])
        logits, depth, state = self.runner.decode(self.cache, tok, rows, pos, warm, self.row_plans(seqs), warm_rows)
        for j, (s, d) in enumerate(zip(seqs, depth.tolist())):
            s.logits, s.depth, s.pos, s.token = logits[j], d, s.pos + 1, None
            if s.warm_start and state is not None:
                s.state = state[j]

    def row_plans(self, seqs: list[Sequence]) -> RowPlans:
        """The RowPlans of these rows: the last step's while every row holds the same plan as then (a step of the
        same rows builds no tensors and reads no depth from the device)."""
        plans = [s.plan for s in seqs]
        last = self.last_plans
        if last is None or len(last[0]) != len(plans) or any(a is not b for a, b in zip(last[0], plans)):
            self.last_plans = last = (plans, RowPlans.build(plans, self.runner.device))
        return last[1]

    def _prefill(self, seqs: list[Sequence]) -> None:
        """One chunk of each sequence's prompt: fresh short prompts in one padded pass per prefill depth, the rest
        (long prompts, later chunks) one at a time."""
        together: dict[int, list[Sequence]] = {}
        for s in seqs:
            if s.cached == 0 and len(s.prompt) <= self.prefill_chunk:
                together.setdefault(s.plan.prefill, []).append(s)
            else:
                self._prefill_rows([s], s.cached, min(len(s.prompt), s.cached + self.prefill_chunk))
        for group in together.values():
            self._prefill_rows(group, 0, None)

    def _prefill_rows(self, seqs: list[Sequence], start: int, end: int | None) -> None:
        """Write prompt tokens start..end (None: each prompt to its end, padded) of `seqs`, all at one depth."""
        dev, r = self.runner.device, seqs[0].plan.prefill
        ends = [len(s.prompt) if end is None else end for s in seqs]
        idx = torch.zeros(len(seqs), max(ends) - start, dtype=torch.long, device=dev)
        for j, (s, e) in enumerate(zip(seqs, ends)):
            idx[j, :e - start] = torch.tensor(s.prompt[start:e], device=dev)
        rows = torch.tensor([s.row for s in seqs], device=dev)
        at = start if start == 0 else torch.full((len(seqs),), start, device=dev)
        logits, state = self.runner.chunk(self.cache, idx, at, r, rows)
        for j, (s, e) in enumerate(zip(seqs, ends)):
            s.cached = e
            if e < len(s.prompt):
                continue
            if state is not None:
                self.cache.fill_forward(rows[j:j + 1], None, r, s.plan.depth)
                s.state = state[j, e - start - 1][None] if s.warm_start else None
            s.logits, s.depth = logits[j, e - start - 1], r if self.runner.model.recur else 0
            s.pos = len(s.prompt)

    def _sample(self, seqs: list[Sequence], cancelled: Callable[[Sequence], bool] | None) -> list[Event]:
        events = []
        for s in seqs:
            p = s.params
            token = int(sample_next(s.logits[None], p.temperature, p.top_k, s.generator, p.top_p))
            s.produced, s.logits = s.produced + 1, None
            reason = "cancelled" if cancelled is not None and cancelled(s) else \
                finish_reason(token, p, s.produced, s.pos, self.runner.cfg.seq_len)
            events.append(Event(s.id, token, s.depth, reason))
            if reason is None:
                s.token = token
            else:
                self._release(s, reason)
        return events

    def _release(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.sequences.remove(seq)
        self.free.append(seq.row)

    def cancel_waiting(self, cancelled: Callable[[Sequence], bool]) -> list[Event]:
        """Drop sequences still prefilling whose request went away (their compute stops before the first token)."""
        gone = [s for s in self.sequences if s.cached < len(s.prompt) and cancelled(s)]
        for s in gone:
            self._release(s, "cancelled")
        return [Event(s.id, -1, 0, "cancelled") for s in gone]
