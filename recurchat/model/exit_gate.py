"""A learned exit gate: a tiny probe that reads the recurrent state after iteration i and says whether stopping there
is safe, i.e. whether going on to the deepest depth would still move the next-token distribution by more than τ.

    recurchat exit-train --ckpt runs/tiny          # trains it on the frozen model, stores it beside the weights
    recurchat sample --ckpt runs/tiny --exit gate:0.9 -p "In the beginning"

Features of one token at iteration i (1-based): the RMS-normalised state s_i, log of the relative change
‖s_i − s_{i−1}‖ / ‖s_i‖ (s_0 is the initial state), and i itself (a learned bias per iteration). One hidden layer of
`hidden` units, then a logit of P(safe): by default KL(p_deepest ‖ p_i) ≤ τ; with the label "answer", the argmax
after iteration i is the one it keeps to the deepest iteration (`settled`) — what accuracy needs, where a tight τ
also waits for the confidence to finish sharpening. A check costs one d×hidden matmul on the exiting rows'
states — no coda, no head — and, unlike the latent criterion, it can stop a token after its first iteration.
`trajectory` gives the per-iteration states and their distance to the deepest distribution that the gate learns
from. Training lives in train/exit_gate.py; checks in infer/exit.py. Exercised by `pytest tests/infer/test_gate.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from recurchat.model.layers import norm
from recurchat.model.recurrent import RecurrentLM


class ExitGate(nn.Module):
    def __init__(self, d_model: int, max_iterations: int, hidden: int = 64):
        super().__init__()
        self.d_model, self.max_iterations, self.hidden = d_model, max_iterations, hidden
        self.proj = nn.Linear(d_model + 1, hidden)
        self.step_bias = nn.Embedding(max_iterations, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.step_bias.weight)

    @property
    def spec(self) -> dict:
        """The constructor arguments, stored with the weights."""
        return {"d_model": self.d_model, "max_iterations": self.max_iterations, "hidden": self.hidden}

    def forward(self, state: torch.Tensor, prev_state: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
        """Logit that stopping at iteration `step` is safe; state and prev_state [..., d], step an int or [...]."""
        s = state.float()
        change = (s - prev_state.float()).norm(dim=-1) / s.norm(dim=-1).clamp_min(1e-12)
        x = torch.cat((norm(s), change.clamp_min(1e-6).log().unsqueeze(-1)), dim=-1)
        step = torch.as_tensor(step, device=s.device).clamp(1, self.max_iterations) - 1
        h = torch.relu(self.proj(x) + self.step_bias(step))
        return self.out(h).squeeze(-1)


def settled(tops: torch.Tensor) -> torch.Tensor:
    """tops [depth, ...], the answer (argmax) after iterations 1..depth → bool [depth, ...]: from iteration i on the
    answer never changes again (it equals the deepest one at i and at every later iteration)."""
    same = (tops == tops[-1]).int()
    return same.flip(0).cumprod(0).flip(0).bool()


@torch.no_grad()
def trajectory(model: RecurrentLM, idx: torch.Tensor,
               depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states [depth + 1, B, T, d] — s_0 … s_depth —, kl [depth, B, T], tops [depth, B, T]) for a batch of sequences
    at fixed depth: kl[i − 1] = KL(p_depth ‖ p_i) in nats between the deepest next-token distribution and the one
    after iteration i, tops[i − 1] the argmax after iteration i (every position runs every iteration, as in the
    training forward)."""
    if not model.recur:
        raise ValueError("a standard model has no iterations to gate")
    states, cos, sin = model.unroll(idx, depth)

    def logp(s: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model.tail_logits(s, cos, sin).float(), dim=-1)

    deep = logp(states[-1])
    kls, tops = [], []
    for s in states[1:]:
        current = logp(s)
        kls.append((deep.exp() * (deep - current)).sum(dim=-1))
        tops.append(current.argmax(dim=-1))
    return torch.stack(states).float(), torch.stack(kls).clamp_min(0), torch.stack(tops)
