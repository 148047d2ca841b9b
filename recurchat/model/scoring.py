"""`scoring(model, dtype)`: the one context every evaluation pass runs in.

Eval mode (restored afterwards), no autograd, the caller's RNG untouched (state_init=noise draws from it, so a run
that evaluates mid-training still resumes bit for bit), and the run's compute dtype (model/hardware.py).

    with scoring(model, dtype):
        loss = model(x, y, num_recur=r, loss_reduction="none")

Exercised by `pytest tests/eval` and `tests/train/test_trainer.py::test_exact_resume_fp32`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from recurchat.model.hardware import DtypeChoice


@contextlib.contextmanager
def scoring(model: torch.nn.Module, dtype: DtypeChoice | None = None) -> Iterator[torch.device]:
    """Yields the model's device; `dtype` None means plain fp32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with dtype.autocast(device) if dtype is not None else contextlib.nullcontext():
                yield device
    finally:
        model.train(was_training)
