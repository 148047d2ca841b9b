"""Optimizers and the LR schedule: Muon for 2-D block/adapter matrices, AdamW for the rest.

Muon orthogonalises updates of hidden weight matrices (the shared blocks' at `lr_shared_scale` times the rate);
embeddings, the lm_head and any vectors keep AdamW (Muon is defined for 2-D matrices of hidden layers only). Muon is
torch's, with its Newton–Schulz iteration in `ns_dtype` (train/muon.py): the run's compute dtype, so a CPU that
emulates bf16 never orthogonalises in it.
Schedule: linear warmup, constant, linear warmdown to `final_lr_frac`. Exercise: `pytest tests/train/test_optim.py`.
"""

from __future__ import annotations

import torch

from recurchat.config import TrainConfig
from recurchat.train.muon import Muon


def param_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters by optimizer group; `shared` holds the shared blocks' matrices (Muon at lr_shared_scale × lr)."""
    groups: dict[str, list[torch.nn.Parameter]] = {"matrix": [], "shared": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("recur.") and p.ndim == 2:
            groups["shared"].append(p)
        elif name.startswith("embed."):
            groups["embed"].append(p)
        elif name.startswith("lm_head."):
            groups["head"].append(p)
        elif p.ndim == 2:
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig,
                     ns_dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """Muon (Newton–Schulz in `ns_dtype`) for the hidden matrices, AdamW for embeddings, head and vectors."""
    g = param_groups(model)
    optimizers: list[torch.optim.Optimizer] = []
    muon_groups = [{"params": g[k], "lr": lr} for k, lr in
                   (("matrix", cfg.lr_matrix), ("shared", cfg.lr_matrix * cfg.lr_shared_scale)) if g[k]]
    if muon_groups:
        optimizers.append(Muon(muon_groups, lr=cfg.lr_matrix, momentum=0.95, nesterov=True,
                               weight_decay=cfg.weight_decay, adjust_lr_fn="original", ns_dtype=ns_dtype))
    adam_groups = [{"params": g[k], "lr": lr} for k, lr in
                   (("embed", cfg.lr_embed), ("head", cfg.lr_head), ("scalar", cfg.lr_scalar)) if g[k]]
    optimizers.append(torch.optim.AdamW(adam_groups, betas=tuple(cfg.adam_betas), eps=1e-10, weight_decay=0.0))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Warmup over `warmup_steps`, constant, then linear warmdown over the last `warmdown_frac` of max_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    warmdown = int(round(cfg.warmdown_frac * cfg.max_steps))
    start = cfg.max_steps - warmdown
    if warmdown <= 0 or step < start:
        return 1.0
    progress = (step - start) / warmdown
    return 1.0 - progress * (1.0 - cfg.final_lr_frac)


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
