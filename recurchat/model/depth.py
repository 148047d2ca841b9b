"""Recursion-depth samplers: which r each training micro-step runs.

Specs: `fixed` (r = r̄), `fixed:R`, and `poisson-lognormal` (τ ~ LogNormal(μ, σ), r = 1 + Poisson(τ), clamped to
[1, r_max]). We choose μ = ln(r̄ − 1) − σ²/2 so that E[τ] = r̄ − 1 and hence E[r] = r̄ (before the clamp, which
moves the mean by well under 1% when r_max ≥ 4·r̄). The common alternative μ = ln r̄ − σ²/2 trains at mean r̄ + 1.

Draws come from a torch.Generator seeded by (seed, step): every rank draws the same r without communicating, and
a resumed run draws the same sequence. An optional curriculum ramps the mean linearly from 1 to r̄ over the first
`curriculum_steps` steps.

Exercise: `pytest tests/model/test_depth.py`.
"""

from __future__ import annotations

import math

import torch

from recurchat.errors import UserError


class DepthSampler:
    def __init__(self, spec: str, mean: float, r_max: int, sigma: float = 0.5, seed: int = 0,
                 curriculum_steps: int = 0):
        if r_max < 1:
            raise UserError(f"r_max must be >= 1, got {r_max}")
        name, _, arg = spec.partition(":")
        if name == "fixed":
            try:
                self.fixed = int(arg) if arg else int(round(mean))
            except ValueError:
                raise UserError(f"bad depth spec {spec!r}: expected fixed:<int>") from None
            if not 1 <= self.fixed <= r_max:
                raise UserError(f"fixed depth {self.fixed} outside [1, r_max={r_max}]")
        elif name == "poisson-lognormal":
            self.fixed = None
            if arg:
                sigma = float(arg)
        else:
            raise UserError(f"unknown depth distribution {spec!r} (fixed[:R] | poisson-lognormal[:sigma])")
        if sigma <= 0:
            raise UserError(f"sigma must be > 0, got {sigma}")
        self.spec, self.mean, self.r_max, self.sigma = spec, float(mean), int(r_max), float(sigma)
        self.seed, self.curriculum_steps = int(seed), int(curriculum_steps)

    def mean_at(self, step: int) -> float:
        """The target E[r] at `step` (the curriculum ramps it from 1 to r̄)."""
        if self.curriculum_steps > 0 and step < self.curriculum_steps:
            return 1.0 + (self.mean - 1.0) * step / self.curriculum_steps
        return self.mean

    def generator(self, step: int) -> torch.Generator:
        # A large odd multiplier keeps (seed, step) pairs from colliding for any realistic run.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))

    def sample(self, step: int, n: int = 1) -> list[int]:
        """n draws for `step` (one per micro-step of that optimizer step); the same on every rank and every run."""
        mean = self.mean_at(step)
        if self.fixed is not None:
            r = self.fixed if not self.curriculum_steps else max(1, min(self.fixed, math.ceil(mean)))
            return [r] * n
        if mean <= 1.0:
            return [1] * n
        g = self.generator(step)
        mu = math.log(mean - 1.0) - self.sigma**2 / 2
        tau = torch.empty(n, dtype=torch.float64).log_normal_(mu, self.sigma, generator=g)
        r = 1 + torch.poisson(tau, generator=g)
        return r.clamp_(1, self.r_max).long().tolist()
