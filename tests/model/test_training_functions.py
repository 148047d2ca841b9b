"""The autograd Functions eager training runs for RMSNorm and rotary embeddings (model/layers.py RMSNormFunction,
RotaryFunction) against the plain expressions inference and torch.compile use. Run: `pytest
tests/model/test_training_functions.py`."""

import pytest
import torch
import torch.nn.functional as F

from recurchat.model.layers import RMSNormFunction, RotaryFunction, apply_rotary, norm, rotary_tables


def plain_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def test_norm_and_rotary_gradients_are_exact_in_float64():
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rotary_tables(5, 8))
    assert torch.autograd.gradcheck(lambda t: RMSNormFunction.apply(t, 1e-6), (x,))
    assert torch.autograd.gradcheck(lambda t: RotaryFunction.apply(t, cos, sin), (x,))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -6)])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_training_norm_matches_rms_norm_and_its_gradient(dtype, tol, eps):
    x = (torch.randn(4, 16, 64) * 3).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(4, 16, 64, dtype=dtype)
    out = norm(a, eps)
    assert type(out.grad_fn).__name__.startswith("RMSNormFunction") and out.dtype == dtype
    expected = F.rms_norm(b, (64,), eps=eps)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=4 * tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -6)])
def test_training_rotary_matches_the_expression_and_its_gradient(dtype, tol):
    cos, sin = rotary_tables(16, 64)
    x = torch.randn(2, 16, 4, 64, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 16, 4, 64, dtype=dtype)
    out = apply_rotary(a, cos, sin)
    assert type(out.grad_fn).__name__.startswith("RotaryFunction") and out.dtype == dtype
    expected = plain_rotary(b, cos, sin)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)


def test_without_gradients_norm_and_rotary_are_the_plain_expressions():
    cos, sin = rotary_tables(16, 64)
    x = torch.randn(2, 16, 4, 64, requires_grad=True)
    with torch.no_grad():
        normed, rotated = norm(x), apply_rotary(x, cos, sin)
    assert normed.grad_fn is None and rotated.grad_fn is None
    assert torch.equal(normed, F.rms_norm(x.detach(), (64,)))
    assert torch.equal(rotated, plain_rotary(x.detach(), cos, sin))


def test_norm_gradient_stays_fp32_when_backward_runs_under_bf16_autocast():
    x = torch.randn(4, 16, 64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(4, 16, 64)
    with torch.autocast("cpu", torch.bfloat16):
        norm(a).backward(grad)  # linalg.vecdot is a bf16 op under autocast
    F.rms_norm(b, (64,)).backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
