"""FLOPs accounting against torch's FlopCounterMode (math SDPA so attention is counted).

Run: `pytest tests/model/test_flops.py`.
"""

import dataclasses

import pytest
import torch
from support import random_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from recurchat.infer.engine import Engine
from recurchat.infer.exit import ExitCriterion
from recurchat.infer.kv_cache import KVCache
from recurchat.infer.plan import DepthPlan, RowPlans
from recurchat.model.flops import decode_bytes_per_step, flops_per_token, mfu
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


class ReadBytes(TorchDispatchMode):
    """Bytes of the weight operand of every matmul and of the keys and values every attention reads (torch's
    kernel, or the two batched matmuls of a decode step's single_query_attention)."""

    def __init__(self):
        super().__init__()
        self.weights = self.kv = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.weights += args[1].numel() * args[1].element_size()
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.kv += sum(t.numel() * t.element_size() for t in args[1:3])
        if func is torch.ops.aten.bmm.default:  # a decode step's single_query_attention: Kᵀ, then V
            self.kv += args[1].numel() * args[1].element_size()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows, r", [(1, 3), (3, 2)])
def test_decode_bytes_per_step_are_the_bytes_a_decode_step_reads(tiny_cfg, rows, r):
    """Counted from the ops of a real fixed-depth decode step (fp32) at position 5: the matmuls' weights (the fused
    QKV matrix is one read of Wq, Wk, Wv) and the K/V of 6 positions in every layer use."""
    engine = Engine(random_model(tiny_cfg), dtype="fp32")
    cache = KVCache(tiny_cfg, "full", rows, tiny_cfg.seq_len, r)
    plans = RowPlans.same(DepthPlan(ExitCriterion("fixed", r), 1, r, r), rows, torch.device("cpu"))
    with torch.no_grad():
        engine.runner.prefill(cache, torch.ones(rows, 5, dtype=torch.long), torch.full((rows,), 5), r, r)
        with ReadBytes() as read:
            engine.runner.decode(cache, torch.ones(rows, dtype=torch.long), torch.arange(rows), torch.full((rows,), 5),
                                 None, plans)
    assert decode_bytes_per_step(tiny_cfg, 0, 6, 4, 4, num_recur=r) == read.weights
    assert decode_bytes_per_step(tiny_cfg, rows, 6, 4, 4, num_recur=r) == read.weights + read.kv
    # the weights are the FLOP count's matrices: 2 FLOPs per parameter use, 4 bytes per parameter in fp32
    assert read.weights == 2 * flops_per_token(tiny_cfg, r, backward=False, seq_len=0)
