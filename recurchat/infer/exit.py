"""Per-row early-exit criteria, checked after each recurrent iteration from min_steps to max_steps.

    fixed:R     stop at iteration R (no check cost)
    kl:T        KL(p_i ‖ p_{i−1}) < T between next-token distributions of consecutive iterations
    entropy:T   |H(p_i) − H(p_{i−1})| < T
    latent:T    ‖s_i − s_{i−1}‖ / ‖s_i‖ < T on the recurrent state
    cosine:T    1 − cos(s_i, s_{i−1}) < T on the recurrent state (blind to a change of scale)
    argmax:N    the argmax token has not changed for N consecutive iterations
    gate:P      the checkpoint's learned exit gate (model/exit_gate.py, `recurchat exit-train`) puts the chance that
                stopping now is safe at ≥ P; the only criterion that can stop a token after its first iteration
Cost per check: kl, entropy and argmax need the coda and lm_head on the current state (for cpu-tiny ≈ the cost of
one more recurrent iteration plus the head); latent and cosine need only norms of the state, so they are the
cheapest; gate adds one d×64 matmul.

Exercise: `pytest tests/infer/test_exit.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recurchat.errors import UserError

KINDS = ("fixed", "kl", "entropy", "latent", "cosine", "argmax", "gate")
STATE_KINDS = ("latent", "cosine")  # compare the state with the previous iteration's


@dataclass(frozen=True)
class ExitCriterion:
    kind: str
    value: float

    @classmethod
    def parse(cls, spec: str) -> "ExitCriterion":
        kind, _, arg = spec.partition(":")
        if kind not in KINDS or not arg:
            raise UserError(f"bad exit criterion {spec!r} "
                            "(fixed:R | kl:T | entropy:T | latent:T | cosine:T | argmax:N | gate:P)")
        try:
            value = float(arg)
        except ValueError:
            raise UserError(f"bad exit criterion {spec!r}: {arg!r} is not a number") from None
        if value < 0 or (kind in ("fixed", "argmax") and (value < 1 or value != int(value))) or \
                (kind == "gate" and not 0 < value <= 1):
            raise UserError(f"bad exit criterion {spec!r}: threshold out of range")
        return cls(kind, value)

    def __str__(self) -> str:
        v = int(self.value) if self.kind in ("fixed", "argmax") else self.value
        return f"{self.kind}:{v}"

    @property
    def needs_logits(self) -> bool:
        return self.kind in ("kl", "entropy", "argmax")


class ExitTracker:
    """Per-row memory of the previous iteration (state, log-probs, argmax streak) for one decode step's rows.

    `gate` is the learned exit gate (needed by gate:P); `initial_state` [n, d] is s_0, which the gate compares s_1
    with (the other state criteria start comparing at iteration 2).
    """

    def __init__(self, criterion: ExitCriterion, n_rows: int, device: torch.device, gate=None,
                 initial_state: torch.Tensor | None = None):
        self.c = criterion
        if criterion.kind == "gate" and gate is None:
            raise UserError(f"exit {criterion} needs this checkpoint's exit gate; run recurchat exit-train first")
        self.gate = gate
        self.prev_state: torch.Tensor | None = initial_state if criterion.kind == "gate" else None
        self.prev_logp: torch.Tensor | None = None
        self.prev_argmax: torch.Tensor | None = None
        self.streak = torch.zeros(n_rows, dtype=torch.long, device=device)

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the rows that exited (mask = rows that stay active)."""
        self.streak = self.streak[mask]
        for name in ("prev_state", "prev_logp", "prev_argmax"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[mask])

    def update(self, step: int, state: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Record iteration `step` (1-based) for the active rows; return a bool mask of rows that should exit.

        state [n, d] (the last position's recurrent state), logits [n, V] or None.
        """
        c = self.c
        n = state.size(0)
        if c.kind == "fixed":
            return torch.full((n,), step >= c.value, dtype=torch.bool, device=state.device)
        done = torch.zeros(n, dtype=torch.bool, device=state.device)
        if c.kind in STATE_KINDS or c.kind == "gate":
            if self.prev_state is not None:
                done = self._state_stat(state) < c.value if c.kind in STATE_KINDS else \
                    torch.sigmoid(self.gate(state, self.prev_state, step)) >= c.value
            self.prev_state = state
            return done
        logp = torch.log_softmax(logits.float(), dim=-1)
        if c.kind == "argmax":
            top = logp.argmax(dim=-1)
            if self.prev_argmax is not None:
                self.streak = torch.where(top == self.prev_argmax, self.streak + 1, torch.zeros_like(self.streak))
                done = self.streak >= c.value
            self.prev_argmax = top
            return done
        if self.prev_logp is not None:
            if c.kind == "kl":
                stat = (logp.exp() * (logp - self.prev_logp)).sum(dim=-1)
            else:
                stat = (entropy(logp) - entropy(self.prev_logp)).abs()
            done = stat < c.value
        self.prev_logp = logp
        return done


    def _state_stat(self, state: torch.Tensor) -> torch.Tensor:
        s, prev = state.float(), self.prev_state.float()
        if self.c.kind == "cosine":
            return 1 - torch.nn.functional.cosine_similarity(s, prev, dim=-1)
        return (s - prev).norm(dim=-1) / s.norm(dim=-1).clamp_min(1e-12)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(dim=-1)
