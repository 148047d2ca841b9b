"""Recursion settings and depth plans: what a request asks for (RecurParams), checked before any compute, and what
a decode step runs for each of its rows (DepthPlan: exit criterion, minimum and maximum iterations, prefill depth;
RowPlans: the plans of a step's rows side by side, so rows of different depths and criteria share one step).

Used by infer/engine.py (decode), infer/batcher.py (continuous batching) and the server. Exercised by
`pytest tests/infer/test_engine.py tests/infer/test_batcher.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recurchat.config import ModelConfig
from recurchat.errors import UserError
from recurchat.infer.exit import ExitCriterion, ExitTracker
from recurchat.infer.kv_cache import iteration_slots


@dataclass
class RecurParams:
    num_recur: int | None = None  # fixed depth when `exit` is None (default r̄)
    exit: str | None = None  # e.g. "kl:1e-3": adaptive depth per token
    min_recur: int = 1
    max_recur: int | None = None  # cap for adaptive depth (default r_max)
    prefill_recur: int | None = None  # default: the fixed depth, or r̄ with an exit criterion
    warm_start: bool = False
    kv: str = "full"

    def validate(self, cfg: ModelConfig, limit: int | None = None) -> "RecurParams":
        """Check these settings against a model (and a deployment's depth `limit`) before any compute, raising
        RecurError that names the field. The CLI, the server and the eval sweep all call this."""
        if self.num_recur is not None and self.exit:
            raise RecurError("give a fixed depth (num_recur) or an exit criterion (exit), not both", "num_recur")
        for name in ("num_recur", "min_recur", "max_recur", "prefill_recur"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecurError(f"{name} must be >= 1, got {value}", name)
            if value is not None and limit is not None and value > limit:
                raise RecurError(f"{name}={value} exceeds the limit of {limit}", name)
        if self.exit:
            try:
                crit = ExitCriterion.parse(self.exit)
            except UserError as e:
                raise RecurError(str(e), "exit") from None
            if crit.kind == "fixed" and limit is not None and crit.value > limit:
                raise RecurError(f"exit {self.exit!r} exceeds the limit of {limit}", "exit")
        if self.min_recur > (self.max_recur or self.num_recur or cfg.r_max):
            raise RecurError("min_recur exceeds the maximum depth", "min_recur")
        fixed = self.num_recur or cfg.mean_recur
        if self.kv.startswith("ring:") and (self.exit or self.prefill_recur not in (None, fixed)):
            # Slot s of a ring serves every iteration ≡ s (mod K). Once a token stops at iteration j, a later token
            # at i < j should read iteration i and one at i ≥ j iteration j − 1, often from the same slot.
            raise RecurError("ring:K keeps the last K iterations of tokens that all run the same depth: use it "
                             "with a fixed depth, and full or last with an exit criterion", "kv")
        try:
            iteration_slots(self.kv, limit or cfg.r_max)
        except UserError as e:
            raise RecurError(str(e), "kv") from None
        return self


class RecurError(UserError):
    """A recursion setting no engine can run; `param` names the RecurParams field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class DepthPlan:
    """How one row runs: its exit criterion (fixed:R for a fixed depth), iterations it must run and may run at most,
    and the depth of its prompt's prefill."""

    criterion: ExitCriterion
    min_steps: int
    max_steps: int
    prefill: int

    @classmethod
    def of(cls, recur: RecurParams, cfg: ModelConfig) -> "DepthPlan":
        if recur.exit:
            crit = ExitCriterion.parse(recur.exit)
            max_steps = recur.max_recur or cfg.r_max
            if crit.kind == "fixed":
                max_steps = min(max_steps, int(crit.value))
            prefill = recur.prefill_recur or min(cfg.mean_recur, max_steps)
        else:
            r = recur.num_recur or cfg.mean_recur
            crit, max_steps, prefill = ExitCriterion("fixed", r), r, recur.prefill_recur or r
        if max_steps < 1 or recur.min_recur < 1 or prefill < 1:
            raise UserError("recursion depths must be >= 1")
        return cls(crit, max(1, min(recur.min_recur, max_steps)), max_steps, max(prefill, 1))

    @property
    def depth(self) -> int:
        """The deepest iteration this plan can reach (decode or prefill): the KV slots it needs."""
        return max(self.max_steps, self.prefill)


UNKNOWN = object()  # RowPlans.known_fixed_depth before fixed_depth() has looked


@dataclass
class RowPlans:
    """The plans of a decode step's rows: `criteria` holds each distinct criterion once, `group[b]` indexes row b's;
    min_steps and max_steps are per row. `take(mask)` keeps the rows of a mask, all fields together."""

    criteria: list[ExitCriterion]
    group: torch.Tensor  # [n] long
    min_steps: torch.Tensor  # [n] long
    max_steps: torch.Tensor  # [n] long
    known_fixed_depth: int | None | object = field(default=UNKNOWN, compare=False)  # fixed_depth(), once read

    @classmethod
    def build(cls, plans: list[DepthPlan], device: torch.device) -> "RowPlans":
        criteria = list(dict.fromkeys(p.criterion for p in plans))
        where = {c: i for i, c in enumerate(criteria)}
        return cls(criteria, torch.tensor([where[p.criterion] for p in plans], device=device),
                   torch.tensor([p.min_steps for p in plans], device=device),
                   torch.tensor([p.max_steps for p in plans], device=device))

    @classmethod
    def same(cls, plan: DepthPlan, n: int, device: torch.device) -> "RowPlans":
        def full(v: int) -> torch.Tensor:
            return torch.full((n,), v, dtype=torch.long, device=device)
        return cls([plan.criterion], full(0), full(plan.min_steps), full(plan.max_steps))

    def fixed_depth(self) -> int | None:
        """The depth every row runs when all of them run one fixed depth (no criterion to check), else None; read
        from the device once per RowPlans (the batcher keeps one while its rows' plans stay the same)."""
        if self.known_fixed_depth is UNKNOWN:
            depths = set() if any(c.kind != "fixed" for c in self.criteria) else set(self.max_steps.tolist())
            self.known_fixed_depth = depths.pop() if len(depths) == 1 else None
        return self.known_fixed_depth

    def take(self, mask: torch.Tensor) -> "RowPlans":
        return RowPlans(self.criteria, self.group[mask], self.min_steps[mask], self.max_steps[mask])


class ExitChecks:
    """The exit trackers of one decode step: one per criterion among its rows, each over that criterion's rows in
    order, and the steps at which any row can stop (the other iterations run with no check and no host sync)."""

    def __init__(self, plans: RowPlans, initial_state: torch.Tensor, gate=None):
        self.criteria, self.trackers, self.first = plans.criteria, {}, {}
        # RowPlans lists only the criteria its rows use: with one, every row is in its group, so checks need no mask
        self.single = len(plans.criteria) == 1
        self.steps = set(plans.max_steps.tolist())
        self.last_step = max(self.steps)
        for g, crit in enumerate(plans.criteria):
            if crit.kind == "fixed":
                continue
            rows = slice(None) if self.single else plans.group == g
            states = initial_state[rows]
            self.trackers[g] = ExitTracker(crit, states.size(0), initial_state.device, gate, states)
            # criteria that compare with the previous iteration start recording one step before the minimum; the
            # gate reads s_{i−1} as a feature, so it records from the first iteration on
            self.first[g] = 1 if crit.kind == "gate" else max(1, int(plans.min_steps[rows].min()) - 1)
            self.steps.update(range(self.first[g], self.last_step + 1))

    def due(self, step: int) -> list[tuple[int, ExitCriterion]]:
        return [(g, self.criteria[g]) for g, first in self.first.items() if step >= first]

    def keep(self, group: torch.Tensor, mask: torch.Tensor) -> None:
        """Drop the rows that stopped: `group` and `mask` (rows that stay) over the step's active rows."""
        for g, tracker in self.trackers.items():
            tracker.keep(mask if self.single else mask[group == g])
