"""Training recipes that keep depth working (docs/ablations/probes/): the loss of one micro-step at r, with Bansal
et al.'s progressive loss mixed in when asked.

    recurchat train --preset probe --data probe:parity:1-8 --progressive-loss 0.5
    recurchat train --init-from runs/chase-1-1 --data probe:chase:1-2 --hint-weight 1

With hint_weight = W > 0 on a probe with intermediate targets (pointer chasing), each iteration's readout is also
trained on the step of the answer's path that iteration should have reached (model/recurrent.py: hint_readout),
their mean loss added with weight W.

With progressive_loss = α > 0 (recursive models), the loss is (1 − α) of the loss at r plus α of the loss after a
random n no-grad iterations and k more with gradients (arXiv 2202.05826), which trains every iteration to improve
on whatever state it is handed. The split is seeded by (seed, micro-step), so ranks and resumed runs draw the same.
Exercised by `pytest tests/model/test_depth_recipes.py tests/train/test_probe_training.py`.
"""

from __future__ import annotations

import torch

from recurchat.config import TrainConfig


def progressive_split(seed: int, micro: int, r: int) -> tuple[int, int]:
    """n ~ U{0..r−1} iterations without gradients, then k ~ U{1..r−n} with them."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + micro + 0x9E55) % (2**63))
    n = int(torch.randint(0, r, (1,), generator=g))
    return n, int(torch.randint(1, r - n + 1, (1,), generator=g))


def micro_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, r: int, micro: int, cfg: TrainConfig,
               recursive: bool, hints: torch.Tensor | None = None) -> torch.Tensor:
    """The loss at r with truncated BPTT (bptt_k), plus hint_weight × the hint loss when hints are given (the
    trainer hands them over only when hint_weight > 0, for a recursive model), plus the progressive term when
    progressive_loss > 0."""
    if hints is not None:
        loss, hint_loss = model(x, y, num_recur=r, bptt_k=cfg.bptt_k, hints=hints, hint_lag=cfg.hint_lag)
        loss = loss + cfg.hint_weight * hint_loss
    else:
        loss = model(x, y, num_recur=r, bptt_k=cfg.bptt_k)
    if cfg.progressive_loss <= 0 or not recursive:
        return loss
    n, k = progressive_split(cfg.seed, micro, r)
    return (1 - cfg.progressive_loss) * loss + cfg.progressive_loss * model(x, y, num_recur=n + k, bptt_k=k)
