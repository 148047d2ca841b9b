"""Soft-capped cross-entropy fused with the lm_head matmul, computed a block of rows at a time (on a CPU).

    loss = head_cross_entropy(x, weight, targets, softcap=15.0)        # x [N, d] normed, weight [V, d], targets [N]

The plain path (`F.linear` → cap·tanh(z/cap) → `.float()` → `F.cross_entropy`) materialises the [N, V] logits
several times over in fp32 for forward and backward: on cpu-tiny (N = 2048, V = 4096) each is a fresh 32 MiB
block that glibc maps and zeroes page by page, and the head took ~20% of an eager bf16 training step. Here each
block of rows is turned into its loss and its share of the gradients while its logits are in cache, and no [N, V]
tensor is ever alive: 121 → 53 ms for the head's forward and backward in bf16, 118 → 70 ms in fp32 (cpu-tiny shape,
2-core Xeon with AMX). torch has no such op (F.cross_entropy takes logits, not the matmul that makes them), hence
this small one. On a GPU the plain path is kept (blocks_pay).

Numerics follow the plain path: the matmul and the cap run in the compute dtype (bf16 under autocast, as nanochat
does), the log-softmax in fp32. Rows whose target is −1 (ignore_index) contribute nothing. Exercise:
`pytest tests/model/test_head_loss.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_BYTES = 4 << 20  # fp32 logits per block: cache-sized, and far below glibc's mmap threshold


def block_rows(n_rows: int, vocab: int) -> int:
    """Rows per block so that a block's fp32 logits take about BLOCK_BYTES (at least 64 rows)."""
    return max(64, min(n_rows, BLOCK_BYTES // (4 * vocab)))


def blocks_pay(x: torch.Tensor) -> bool:
    """The blocked loss runs on a CPU, eagerly even inside a compiled stage (blocked_cross_entropy is kept from the
    compiler: dynamo breaks the graph around it). On a GPU the plain path is faster, eager (gpu-d20 shape on an
    H200: 197 vs 212 ms per step; the blocks would only save memory, 31 vs 42 GiB) and compiled, where inductor
    fuses the plain loss itself."""
    return x.device.type == "cpu"


def block_logits(z: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's fresh matmul output z (not used again, so written over) as (fp32 capped logits, fp32 tanh(z/cap),
    the factor the cap's gradient needs), or (z in fp32, None) when cap ≤ 0. The cap is computed in z's dtype, as
    softcapped does."""
    if softcap <= 0:
        return z.float(), None
    t = z.div_(softcap).tanh_()
    return (t * softcap).float(), t.float()


def softcapped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """The head's logits: cap·tanh(logits/cap) in the logits' dtype (none when cap ≤ 0), widened to fp32."""
    return (softcap * torch.tanh(logits / softcap)).float() if softcap > 0 else logits.float()


class HeadCrossEntropy(torch.autograd.Function):
    """Summed soft-capped cross-entropy of x @ weightᵀ over the rows whose target is not −1.

    The gradient of a summed cross-entropy is known in the forward up to the scalar that backward brings, so when
    x or the weight needs it, each block's logits are turned into their share of grad x and grad weight right away
    (three matmuls in all, as the plain path, and none recomputed); backward only scales them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, rows: int):
        keep = targets >= 0
        safe = torch.where(keep, targets, 0)
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if wants_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_grad else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        all_kept = bool(keep.all())
        for a in range(0, x.size(0), rows):
            xb, yb, kb = x[a:a + rows], safe[a:a + rows, None], keep[a:a + rows]
            logits, t = block_logits(xb @ weight.t(), softcap)
            top = logits.amax(dim=-1, keepdim=True)
            exp = (logits - top).exp_()
            norm = exp.sum(dim=-1, keepdim=True)
            total += torch.where(kb, (norm.log() + top - logits.gather(1, yb)).squeeze(1), 0.0).sum()
            if wants_grad:
                g = exp.div_(norm)  # the softmax, in place
                g.scatter_add_(1, yb, torch.full_like(norm, -1.0))
                if not all_kept:
                    g.mul_(kb[:, None])
                if t is not None:  # d(cap·tanh(z/cap))/dz = 1 − t², t now in fp32
                    g.mul_(torch.addcmul(torch.ones((), dtype=t.dtype), t, t, value=-1))
                g = g.to(x.dtype)
                torch.mm(g, weight, out=grad_x[a:a + rows])
                if g.dtype == grad_w.dtype:  # accumulated by the matmul itself, no [V, d] temporary
                    grad_w.addmm_(g.t(), xb)
                else:
                    grad_w += g.t() @ xb
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), (grad_w * grad_total).to(ctx.weight_dtype), None, None, None


def head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of soft-capped x @ weightᵀ against `targets` (−1 ignored): `mean` over the kept rows (NaN when
    none is kept, as F.cross_entropy), `sum`, or `none` (one loss per row, 0 where ignored). Under autocast the
    matmul runs in the autocast dtype, as F.linear would."""
    if reduction == "none" or not blocks_pay(x):
        return plain_cross_entropy(x, weight, targets, softcap, reduction)
    total = blocked_cross_entropy(x, weight, targets, float(softcap))
    return total if reduction == "sum" else total / (targets >= 0).sum()


@torch.compiler.disable
def blocked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """The summed loss by HeadCrossEntropy, its matmuls in the autocast dtype when autocast is on."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return HeadCrossEntropy.apply(x, weight, targets, softcap, block_rows(x.size(0), weight.size(0)))


def plain_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                        reduction: str = "mean") -> torch.Tensor:
    """The same loss through the materialised [N, V] logits: under torch.compile, on a GPU, and for
    `reduction="none"`, whose upstream gradient differs per row (0 where the target is −1)."""
    return F.cross_entropy(softcapped(F.linear(x, weight), softcap), targets, ignore_index=-1, reduction=reduction)
