"""FLOPs accounting against torch's FlopCounterMode (math SDPA so attention is counted).

Run: `pytest tests/model/test_flops.py`.
"""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from recurchat.model.flops import flops_per_token, mfu
from recurchat.model.recurrent import RecurrentLM


def counted(model, idx, r, k, backward=True):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        if backward:
            model(idx, idx, num_recur=r, bptt_k=k).backward()
        else:
            with torch.no_grad():
                model(idx, num_recur=r)
    return fc.get_total_flops()


@pytest.mark.parametrize("r,k", [(1, 1), (3, 3), (6, 2), (4, 8)])
@pytest.mark.parametrize("adapter", ["concat", "add"])
def test_training_flops_match_counter(tiny_cfg, r, k, adapter):
    cfg = dataclasses.replace(tiny_cfg, adapter=adapter)
    m = RecurrentLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    ours = flops_per_token(cfg, r, k) * idx.numel()
    theirs = counted(m, idx, r, k)
    assert abs(ours - theirs) / theirs < 0.05


def test_inference_and_standard_flops(tiny_cfg):
    m = RecurrentLM(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, tiny_cfg.seq_len))
    ours = flops_per_token(tiny_cfg, 5, backward=False) * idx.numel()
    assert abs(ours - counted(m, idx, 5, None, backward=False)) / ours < 0.05
    std = tiny_cfg.standard_twin()
    ms = RecurrentLM(std)
    ours = flops_per_token(std) * idx.numel()
    assert abs(ours - counted(ms, idx, None, None)) / ours < 0.05


def test_truncation_saves_backward_only(tiny_cfg):
    full, trunc = flops_per_token(tiny_cfg, 8, 8), flops_per_token(tiny_cfg, 8, 2)
    fwd = flops_per_token(tiny_cfg, 8, backward=False)
    assert fwd < trunc < full
    # the recursive model at r̄ costs about what its unrolled twin costs (adapter matmuls are the difference)
    twin = flops_per_token(tiny_cfg.standard_twin())
    rec = flops_per_token(tiny_cfg, tiny_cfg.mean_recur)
    assert 1.0 <= rec / twin < 1.25


def test_mfu():
    assert mfu(1e6, 1e3, 2e9) == pytest.approx(0.5)
    assert mfu(1e6, 1e3, 0) == 0.0
