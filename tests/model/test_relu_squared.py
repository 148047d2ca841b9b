"""The MLP's fused relu² (model/layers.py ReluSquared) against autograd's relu → square."""

import pytest
import torch
import torch.nn.functional as F

from recurchat.model.layers import ReluSquared, relu_squared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_matches_autograd_of_relu_then_square(dtype):
    x = torch.randn(64, 48, dtype=dtype)
    x[0, :4] = 0.0  # the kink: both give gradient 0 there
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(64, 48, dtype=dtype)
    out = relu_squared(a)
    assert type(out.grad_fn).__name__.startswith("ReluSquared")  # the fused op is the one autograd records
    out.backward(grad)
    F.relu(b).square().backward(grad)
    torch.testing.assert_close(out, F.relu(x).square())
    torch.testing.assert_close(a.grad, b.grad)
    assert ReluSquared.apply(x).dtype == dtype


def test_without_gradients_relu_squared_is_the_plain_expression():
    x = torch.randn(8, 8, requires_grad=True)
    with torch.no_grad():
        out = relu_squared(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.relu(x.detach()).square())
