"""Bits per byte on held-out text at any recursion depth r.

bpb = Σ cross-entropy (nats) / (ln 2 · Σ UTF-8 bytes of the target tokens); special tokens (0 bytes) are excluded,
so the number is comparable across tokenizers. Exercise: `recurchat eval --ckpt DIR --tasks bpb --recur 1,2,4,8`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recurchat.data.loader import eval_batches
from recurchat.model.hardware import DtypeChoice
from recurchat.model.scoring import scoring


def evaluate_bpb(model: torch.nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, batch_size: int,
                 seq_len: int, max_tokens: int, num_recur: int | None = None,
                 dtype: DtypeChoice | None = None) -> float:
    """bpb of up to `max_tokens` held-out tokens at depth `num_recur`, in `dtype` (None: fp32)."""
    nats = nbytes = 0.0
    with scoring(model, dtype) as device:
        token_bytes = token_bytes.to(device)
        for x, y in eval_batches(tokens, batch_size, seq_len, max_tokens):
            x, y = x.to(device), y.to(device)
            loss = model(x, y, num_recur=num_recur, loss_reduction="none")
            b = token_bytes[y]
            nats += float((loss.double() * (b > 0)).sum())
            nbytes += float(b.sum())
    return nats / (math.log(2) * nbytes) if nbytes > 0 else float("nan")


def evaluate_rows_bpb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, token_bytes: torch.Tensor,
                      batch_size: int, num_recur: int | None = None, dtype: DtypeChoice | None = None) -> float:
    """bpb over the supervised targets (y != −1) of pre-built rows, e.g. the assistant turns of SFT data."""
    nats = nbytes = 0.0
    with scoring(model, dtype) as device:
        token_bytes = token_bytes.to(device)
        for i in range(0, x.size(0), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            loss = model(xb, yb, num_recur=num_recur, loss_reduction="none")
            b = token_bytes[yb.clamp_min(0)] * (yb >= 0)
            nats += float((loss.double() * (b > 0)).sum())
            nbytes += float(b.sum())
    return nats / (math.log(2) * nbytes) if nbytes > 0 else float("nan")


def evaluate_bpb_exit(engine, tokens: np.ndarray, token_bytes: torch.Tensor, batch_size: int, seq_len: int,
                      max_tokens: int, recur) -> tuple[float, float]:
    """(bpb, mean recursions per token) when every token picks its own depth by an exit criterion.

    Runs through the KV-cached engine one position at a time (`Engine.score`), so it measures exactly what
    adaptive generation would spend.
    """
    token_bytes = token_bytes.to(engine.device)
    nats = nbytes = 0.0
    depth_sum = count = 0
    with scoring(engine.model, engine.dtype):
        for x, y in eval_batches(tokens, batch_size, seq_len, max_tokens):
            nll, depth, _ = engine.score(x, y, recur)
            b = token_bytes[y.to(engine.device)]
            nats += float((nll.double() * (b > 0)).sum())
            nbytes += float(b.sum())
            depth_sum += int(depth.sum())
            count += depth.numel()
    bpb = nats / (math.log(2) * nbytes) if nbytes > 0 else float("nan")
    return bpb, depth_sum / max(count, 1)
