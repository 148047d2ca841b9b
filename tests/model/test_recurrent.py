"""The recursive LM: adapter identity init, truncated BPTT, R = 0 path, shapes, warm start.

Run: `pytest tests/model/test_recurrent.py`.
"""

import dataclasses

import pytest
import torch

from recurchat.model.layers import norm
from recurchat.model.recurrent import RecurrentLM


def randomize(model: RecurrentLM, seed: int = 0) -> RecurrentLM:
    """Init makes blocks identities and the adapter ignore s; perturb so tests see depth-dependent compute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "adapter" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_shapes_and_loss(tiny_cfg):
    torch.manual_seed(0)
    m = RecurrentLM(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    logits = m(idx)
    assert logits.shape == (2, 16, tiny_cfg.vocab_size)
    loss = m(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    per_tok = m(idx, idx, loss_reduction="none")
    assert per_tok.shape == (2, 16)
    assert torch.allclose(per_tok.mean(), loss, atol=1e-5)
    # soft-cap bounds the logits
    assert logits.abs().max() <= tiny_cfg.logit_softcap + 1e-4


def test_concat_adapter_identity_init(tiny_cfg):
    m = RecurrentLM(dataclasses.replace(tiny_cfg, adapter_init="e"))
    W = m.adapter.proj.weight
    d = tiny_cfg.d_model
    assert torch.equal(W[:, :d], torch.eye(d)) and torch.equal(W[:, d:], torch.zeros(d, d))
    e, s = torch.randn(2, 5, d), torch.randn(2, 5, d)
    assert torch.allclose(m.adapter(e, s), e)


def test_add_adapter(tiny_cfg):
    m = RecurrentLM(dataclasses.replace(tiny_cfg, adapter="add"))
    e, s = torch.randn(2, 5, tiny_cfg.d_model), torch.randn(2, 5, tiny_cfg.d_model)
    assert torch.allclose(m.adapter(e, s), e + s)
    assert sum(p.numel() for p in m.adapter.parameters()) == 0


def test_depth_changes_output_and_iterate_count(tiny_cfg):
    torch.manual_seed(0)
    m = randomize(RecurrentLM(tiny_cfg))
    calls = []
    orig = m.iterate
    m.iterate = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 8))
    a = m(idx, num_recur=1)
    assert len(calls) == 1
    b = m(idx, num_recur=5)
    assert len(calls) == 6
    assert not torch.allclose(a, b)


def test_truncated_bptt_no_graph_for_nograd_iterations(tiny_cfg):
    torch.manual_seed(0)
    m = randomize(RecurrentLM(tiny_cfg))
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    grad_flags = []
    orig = m.iterate

    def spy(e, s, *a, **k):
        out = orig(e, s, *a, **k)
        grad_flags.append(out.requires_grad)
        return out

    m.iterate = spy
    loss = m(idx, idx, num_recur=5, bptt_k=2)
    assert grad_flags == [False, False, False, True, True]
    loss.backward()
    # gradients still reach the prelude (through e in the adapter) and the recurrent weights
    assert m.prelude[0].attn.c_q.weight.grad.abs().sum() > 0
    assert m.recur[0].mlp.c_fc.weight.grad.abs().sum() > 0
    # k >= r means full BPTT
    grad_flags.clear()
    m(idx, idx, num_recur=3, bptt_k=8)
    assert grad_flags == [True, True, True]


def test_truncated_bptt_gradient_equals_detached_reference(tiny_cfg):
    """Gradients with k=2 at r=4 equal those of a hand-written loop that detaches the state after 2 iterations."""
    torch.manual_seed(0)
    m = randomize(RecurrentLM(tiny_cfg))
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    m(idx, idx, num_recur=4, bptt_k=2).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    cos, sin = m.rope(0, 8)
    e = m.run_prelude(idx, cos, sin)
    s = e
    for i in range(4):
        if i == 2:
            s = s.detach()
        s = m.iterate(e, s, cos, sin)
    logits = m.head(m.run_coda(s, cos, sin))
    torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1)).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_standard_model_is_plain_stack(tiny_cfg):
    """R = 0: the same class computes embed → blocks → head with no adapter and no loop."""
    cfg = tiny_cfg.standard_twin()
    assert cfg.n_shared == 0 and cfg.n_prelude == tiny_cfg.n_prelude + tiny_cfg.mean_recur * tiny_cfg.n_shared
    torch.manual_seed(0)
    m = randomize(RecurrentLM(cfg))
    assert m.adapter is None and len(m.recur) == 0
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    cos, sin = m.rope(0, 8)
    x = norm(m.embed(idx))
    for b in [*m.prelude, *m.coda]:
        x = b(x, cos, sin)
    ref = m.head(x)
    assert torch.allclose(m(idx), ref, atol=1e-6)
    assert torch.allclose(m(idx, num_recur=7), ref, atol=1e-6)  # r is meaningless without a recurrent block


def test_a_fresh_recursive_model_gives_the_same_logits_at_every_depth(tiny_cfg):
    """Zero-init output projections: at init every iteration is a no-op on e (e has unit RMS, so with the default
    mean adapter and state norm s₁ = norm((e + e)/2) = e)."""
    m = RecurrentLM(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 8))
    assert torch.allclose(m(idx, num_recur=1), m(idx, num_recur=6), atol=1e-6)


@pytest.mark.parametrize("init", ["e", "zeros", "noise"])
def test_state_init_and_warm_start(tiny_cfg, init):
    torch.manual_seed(0)
    m = randomize(RecurrentLM(dataclasses.replace(tiny_cfg, state_init=init)))
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 8))
    torch.manual_seed(1)
    logits, state = m(idx, num_recur=2, return_state=True)
    assert state.shape == (1, 8, tiny_cfg.d_model)
    # the returned state is the one the logits came from (coda + head on it), and asking for it changes nothing
    assert torch.allclose(m.loss_or_logits(state, *m.rope(0, 8)), logits, atol=1e-6)
    torch.manual_seed(1)
    assert torch.allclose(m(idx, num_recur=2), logits, atol=1e-6)
    # the init is really used: another init (or another noise draw) starts elsewhere and ends elsewhere
    other = RecurrentLM(dataclasses.replace(m.cfg, state_init={"e": "zeros", "zeros": "e"}.get(init, init)))
    other.load_state_dict(m.state_dict())
    torch.manual_seed(2)
    assert not torch.allclose(other(idx, num_recur=2), logits, atol=1e-6)
    # warm start: two iterations from the returned state equal four from scratch
    if init != "noise":
        ref = m(idx, num_recur=4)
        warm = m(idx, num_recur=2, init_state=state)
        assert torch.allclose(ref, warm, atol=1e-5)


def test_bad_arguments(tiny_cfg):
    m = RecurrentLM(tiny_cfg)
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError):
        m(idx, num_recur=0)
    with pytest.raises(ValueError):
        m(idx, bptt_k=0)
    with pytest.raises(ValueError):
        m(torch.zeros(1, tiny_cfg.seq_len + 1, dtype=torch.long))


def test_fused_qkv_in_inference_equals_three_projections_and_follows_weight_updates(tiny_cfg):
    """Without gradients q, k, v come from one matmul over [Wq; Wk; Wv], q and k rotated and normalised as one
    tensor; it must equal the three projections rotated and normalised apart (the path gradients take) and pick
    up an optimizer step (an in-place update) and a load_state_dict without being told."""
    torch.manual_seed(0)
    model = RecurrentLM(tiny_cfg)
    attn = model.prelude[0].attn
    x = torch.randn(2, 5, tiny_cfg.d_model)
    cos, sin = model.rope(3, 5)

    def three():
        with torch.enable_grad():
            return [t.detach() for t in attn.project_qkv(x, cos, sin)]

    with torch.no_grad():
        for fused, plain in zip(attn.project_qkv(x, cos, sin), three()):
            assert torch.allclose(fused, plain, atol=1e-6)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    loss = model(idx, idx)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # in place: the fused copy is now out of date
    with torch.no_grad():
        for fused, plain in zip(attn.project_qkv(x, cos, sin), three()):
            assert torch.allclose(fused, plain, atol=1e-6)
        other = RecurrentLM(tiny_cfg)
        model.load_state_dict(other.state_dict())
        for fused, plain in zip(attn.project_qkv(x, cos, sin), three()):
            assert torch.allclose(fused, plain, atol=1e-6)
        assert torch.allclose(model(idx), other(idx), atol=1e-5)  # the whole model agrees with fresh weights
    assert not any(n.endswith("_fused") for n, _ in model.named_parameters()) and "_fused" not in str(
        list(model.state_dict()))  # nothing new is trained or saved
