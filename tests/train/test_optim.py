"""Muon with a chosen Newton–Schulz dtype, and the LR schedule.

Run: `pytest tests/train/test_optim.py`.
"""

import dataclasses

import pytest
import torch

from recurchat.config import TrainConfig
from recurchat.train.muon import Muon, orthogonalize, orthogonalize_all
from recurchat.train.optim import build_optimizers, lr_multiplier

COEFFS = (3.4445, -4.7750, 2.0315)


def run_steps(opt_cls, shapes, steps=3, **kwargs):
    """Parameters after `steps` updates from fixed gradients, for an optimizer class."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(steps)]
    opt = opt_cls(params, lr=0.02, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("kwargs", [dict(nesterov=True, weight_decay=0.0, adjust_lr_fn="original"),
                                    dict(nesterov=False, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")])
def test_bf16_matches_torch_muon(kwargs):
    shapes = [(32, 48), (64, 16)]  # wide and tall: both orientations of the iteration
    ours, _ = run_steps(lambda p, **kw: Muon(p, ns_dtype=torch.bfloat16, **kw), shapes, **kwargs)
    theirs, _ = run_steps(torch.optim.Muon, shapes, **kwargs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the same ops in the same order


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-3)])  # bf16: ~1 ulp at 0.5
def test_matrices_of_one_shape_are_orthogonalised_together_as_each_alone(dtype, tol, monkeypatch):
    torch.manual_seed(1)
    updates = [torch.randn(16, 24), torch.randn(40, 8), torch.randn(16, 24), torch.randn(40, 8), torch.randn(16, 24),
               torch.randn(12, 12)]  # two shapes batched (wide and tall), one alone
    stacks, baddbmm = [], torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda x, *a, **k: stacks.append(x.size(0)) or baddbmm(x, *a, **k))
    together = orthogonalize_all(updates, COEFFS, 5, 1e-7, dtype)
    monkeypatch.undo()
    assert sorted(set(stacks)) == [2, 3] and len(stacks) == 2 * 5 * 2  # two stacks, 5 steps of 2 products each
    for update, out in zip(updates, together):
        assert out.shape == update.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), orthogonalize(update, COEFFS, 5, 1e-7, dtype).float(), rtol=0,
                                   atol=tol)


def test_fp32_update_is_orthogonal_in_the_ns_band():
    torch.manual_seed(1)
    for shape in ((64, 96), (96, 64)):
        g = torch.randn(*shape) * torch.logspace(-1, 1, shape[1])  # columns over two decades
        out = orthogonalize(g, COEFFS, 5, 1e-7, torch.float32)
        assert out.dtype == torch.float32 and out.shape == g.shape
        sv = torch.linalg.svdvals(out)
        # The band torch.optim.Muon documents for its (bf16) iteration: singular values ~ Uniform(0.5, 1.5)
        assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())
        bf16 = torch.linalg.svdvals(orthogonalize(g, COEFFS, 5, 1e-7, torch.bfloat16).float())
        assert (sv - bf16).abs().max() < 0.05  # fp32 lands where bf16 does (bf16 rounds each op to ~0.4%)
        # the same directions as the exact polar factor U·Vᵀ
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        cos = (out * (u @ vh)).sum() / (out.norm() * (u @ vh).norm())
        assert cos > 0.95


def test_fp32_and_bf16_agree_within_bf16_rounding():
    torch.manual_seed(2)
    g = torch.randn(48, 80)
    a = orthogonalize(g, COEFFS, 5, 1e-7, torch.float32)
    b = orthogonalize(g, COEFFS, 5, 1e-7, torch.bfloat16).float()
    assert ((a - b).norm() / a.norm()) < 3e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per op


def test_update_does_not_modify_the_momentum_buffer_in_fp32():
    """Without nesterov the update *is* the buffer; an in-place normalisation would corrupt it in fp32."""
    _, opt = run_steps(lambda p, **kw: Muon(p, ns_dtype=torch.float32, **kw), [(8, 8)], steps=1, nesterov=False,
                       weight_decay=0.0)
    (buf,) = [s["momentum_buffer"] for s in opt.state.values()]
    torch.manual_seed(0)
    torch.randn(8, 8)  # the parameter's draw
    expected = torch.randn(8, 8) * (1 - 0.95)  # first step: buffer = lerp(0, g, 1 − momentum)
    torch.testing.assert_close(buf, expected)


def test_state_dict_loads_across_torch_and_our_muon():
    _, theirs = run_steps(torch.optim.Muon, [(16, 24)])
    params = [torch.nn.Parameter(torch.zeros(16, 24))]
    ours = Muon(params, lr=0.02, ns_dtype=torch.float32)
    ours.load_state_dict(theirs.state_dict())
    (a,), (b,) = ([s["momentum_buffer"] for s in o.state.values()] for o in (ours, theirs))
    assert torch.equal(a, b)


def test_build_optimizers_passes_the_ns_dtype(tiny_cfg):
    from recurchat.model.recurrent import RecurrentLM

    model = RecurrentLM(tiny_cfg)
    for dtype in (torch.float32, torch.bfloat16):
        muon, adamw = build_optimizers(model, TrainConfig(), dtype)
        assert isinstance(muon, Muon) and muon.ns_dtype == dtype
        assert isinstance(adamw, torch.optim.AdamW)


def test_lr_schedule_warmup_constant_warmdown():
    cfg = dataclasses.replace(TrainConfig(), max_steps=100, warmup_steps=10, warmdown_frac=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(50, cfg) == 1.0
    assert lr_multiplier(80, cfg) == pytest.approx(1.0)  # warmdown starts at step 80
    assert lr_multiplier(90, cfg) == pytest.approx(0.55)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
