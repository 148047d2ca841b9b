"""The fused, blocked head cross-entropy (model/head_loss.py) against the plain logits → cross_entropy path."""

import pytest
import torch
import torch.nn.functional as F

from recurchat.config import ModelConfig
from recurchat.model.head_loss import HeadCrossEntropy, head_cross_entropy
from recurchat.model.recurrent import RecurrentLM


def plain(x, w, y, cap, reduction="mean"):
    z = F.linear(x, w)
    z = (cap * torch.tanh(z / cap) if cap > 0 else z).float()
    return F.cross_entropy(z, y, ignore_index=-1, reduction=reduction)


def problem(n=300, d=32, v=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=dtype) * 0.3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -1
    return x, w, y


def loss_and_grads(fn, x, w):
    loss = fn(x, w)
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), gx, gw


@pytest.mark.parametrize("cap", [15.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [300, 64, 7])
def test_blocked_loss_and_gradients_equal_the_plain_path_in_fp32(cap, reduction, rows):
    x, w, y = problem()
    want = loss_and_grads(lambda a, b: plain(a, b, y, cap, reduction), x, w)

    def fused(a, b):
        total = HeadCrossEntropy.apply(a, b, y, cap, rows)
        return total if reduction == "sum" else total / (y >= 0).sum()

    got = loss_and_grads(fused, x, w)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-6)


def test_per_row_losses_are_the_plain_ones_with_zero_where_ignored():
    x, w, y = problem()
    got = head_cross_entropy(x, w, y, 15.0, reduction="none")
    torch.testing.assert_close(got, plain(x, w, y, 15.0, "none"))
    assert (got[y < 0] == 0).all()


def test_bf16_autocast_error_against_fp64_is_no_worse_than_the_plain_bf16_path():
    x, w, y = problem(n=512, d=64, v=500)
    exact = loss_and_grads(lambda a, b: plain(a.double(), b.double(), y, 15.0), x, w)
    errors = {}
    paths = (("plain", lambda a, b: plain(a, b, y, 15.0)), ("fused", lambda a, b: head_cross_entropy(a, b, y, 15.0)))
    for name, fn in paths:
        with torch.autocast("cpu", torch.bfloat16):
            got = loss_and_grads(fn, x, w)
        assert all(g.dtype == torch.float32 for g in got[1:])  # gradients reach the fp32 master weights
        errors[name] = [((g.double() - t).norm() / t.norm()).item() for g, t in zip(got, exact)]
    for fused_err, plain_err in zip(errors["fused"], errors["plain"]):
        assert fused_err <= 1.5 * plain_err + 1e-6, errors


def test_mean_over_no_kept_row_is_nan_like_cross_entropy():
    x, w, y = problem(n=8)
    y[:] = -1
    assert torch.isnan(head_cross_entropy(x, w, y, 15.0)) and torch.isnan(plain(x, w, y, 15.0))


def test_without_gradients_the_forward_keeps_no_gradient_buffers():
    x, w, y = problem()
    with torch.no_grad():
        loss = head_cross_entropy(x, w, y, 15.0)
    torch.testing.assert_close(loss, plain(x, w, y, 15.0).detach())
    assert loss.grad_fn is None


def test_model_loss_and_gradients_match_cross_entropy_of_its_logits():
    cfg = ModelConfig(vocab_size=96, d_model=32, n_head=2, n_kv_head=1, n_prelude=1, n_shared=1, n_coda=1,
                      mean_recur=2, seq_len=16)
    torch.manual_seed(0)
    model = RecurrentLM(cfg)
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.roll(idx, -1, 1)
    targets[:, -2:] = -1
    loss = model(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(idx)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want)
    for g, t in zip(grads, want_grads):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-6)
