"""The bf16 training attention kernel: short_causal_attention computes what torch's causal GQA kernel computes
(values and gradients), and Attention uses it exactly where it is chosen. Run: `pytest tests/model/test_attention.py`.
"""

import torch
import torch.nn.functional as F

from recurchat.model import layers
from recurchat.model.layers import Attention, short_causal_attention


def qkv(dtype, T=24, B=2, H=4, KV=2, D=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, n, T, D, generator=g).to(dtype).requires_grad_() for n in (H, KV, KV)]


def grads(fn, q, k, v, seed=1):
    y = fn(q, k, v)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype))
    out = [y.detach().float()] + [t.grad.float() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out


def torch_causal_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_short_causal_attention_matches_torch_kernel_in_fp32_values_and_gradients():
    q, k, v = qkv(torch.float32)
    for ours, theirs in zip(grads(short_causal_attention, q, k, v), grads(torch_causal_gqa, q, k, v)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_short_causal_attention_matches_torch_kernel_in_bf16_to_bf16_precision():
    q, k, v = qkv(torch.bfloat16)
    for ours, theirs in zip(grads(short_causal_attention, q, k, v), grads(torch_causal_gqa, q, k, v)):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)


def test_compiled_short_causal_attention_runs_the_causal_softmax_op_and_matches_fp32_values_and_gradients():
    q, k, v = qkv(torch.float32)
    ops = []

    def recording_backend(gm, example_inputs):  # the graph dynamo hands the compiler, then AOT autograd on it
        ops.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(short_causal_attention, backend=recording_backend)
    for ours, theirs in zip(grads(compiled, q, k, v), grads(torch_causal_gqa, q, k, v)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert f"{layers.OP_NAMESPACE}.causal_softmax.default" in {str(op) for op in ops}


def test_short_causal_attention_is_causal():
    q, k, v = qkv(torch.float32)
    y = short_causal_attention(q, k, v)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 10:], v2[:, :, 10:] = 0.0, 5.0  # change only keys and values after position 9
    y2 = short_causal_attention(q, k2, v2)
    assert torch.equal(y[:, :, :10], y2[:, :, :10]) and not torch.allclose(y[:, :, 10:], y2[:, :, 10:])


def test_attention_uses_the_short_kernel_only_for_bf16_training_up_to_the_length_limit(monkeypatch):
    calls = []

    def recorded(q, k, v):
        calls.append(q.size(-2))
        return torch_causal_gqa(q, k, v)

    monkeypatch.setattr(layers, "short_causal_attention", recorded)
    attn = Attention(64, 4, 2)
    cos, sin = layers.rotary_tables(layers.SHORT_ATTENTION_LEN + 1, 16)

    def run(T, grad=True, bf16=True):
        x = torch.randn(1, T, 64)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            attn(x, cos[:, :T], sin[:, :T])

    run(8)
    run(layers.SHORT_ATTENTION_LEN)
    assert calls == [8, layers.SHORT_ATTENTION_LEN]
    run(8, grad=False)
    run(8, bf16=False)
    run(layers.SHORT_ATTENTION_LEN + 1)
    assert calls == [8, layers.SHORT_ATTENTION_LEN]


def test_single_query_attention_matches_torch_kernel_with_grouped_heads_and_a_per_row_mask():
    from recurchat.model.layers import single_query_attention, window_mask

    torch.manual_seed(0)
    B, H, KV, L, D = 3, 4, 2, 9, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, KV, L, D), torch.randn(B, KV, L, D)
    mask = window_mask(torch.tensor([8, 4, 6]), L, 0)[:, None, None, :]  # rows at their own positions
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(single_query_attention(q, k, v, mask), want)
