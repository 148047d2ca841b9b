"""torch.compile without recompiles: after warm-up, new r values (training and eval) add no graphs; compiled
outputs and gradients match eager. Run: `pytest tests/model/test_compile.py`."""

import copy

import pytest
import torch
import torch._dynamo

from recurchat.model.recurrent import RecurrentLM


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def perturbed(cfg):
    torch.manual_seed(0)
    m = RecurrentLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "c_proj" in name or "adapter" in name or "lm_head" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.slow
def test_compiled_matches_eager_and_never_recompiles_for_r(tiny_cfg):
    torch._dynamo.reset()
    eager = perturbed(tiny_cfg)
    comp = copy.deepcopy(eager).compile_stages()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.seq_len))
    k = 2

    # outputs and gradients match (fp32), with a truncated step (r > k) so both graph kinds run
    for r in (1, 5):
        le, lc = eager(x, x, num_recur=r, bptt_k=k), comp(x, x, num_recur=r, bptt_k=k)
        assert torch.allclose(le, lc, atol=1e-5, rtol=1e-5)
        le.backward()
        lc.backward()
        for (n, pe), (_, pc) in zip(eager.named_parameters(), comp.named_parameters()):
            assert torch.allclose(pe.grad, pc.grad, atol=1e-5, rtol=1e-4), n
        eager.zero_grad()
        comp.zero_grad()
    with torch.no_grad():
        assert torch.allclose(eager(x, num_recur=3), comp(x, num_recur=3), atol=1e-5)
        comp(x, x, num_recur=2)  # eval-loss path warm-up

    # warm-up done: 8+ distinct r in training and evaluation add no graph
    before = graphs()
    for r in (2, 3, 4, 6, 7, 8, 9, 12):
        comp(x, x, num_recur=r, bptt_k=k).backward()
        with torch.no_grad():
            comp(x, x, num_recur=r)
            comp(x, num_recur=r)
    assert graphs() == before


def test_bf16_training_compiles_the_iteration_once_per_grad_mode_and_state_kind(tiny_cfg):
    """Under autocast the prelude hands the loop an fp32 e while each iteration returns bf16, and state_init e makes
    s₀ the very tensor e: unless the loop's inputs are normalised, dynamo compiles the iteration again for every
    dtype and aliasing combination and, past its limit of 8 (reached on an H200), runs the rest eagerly."""
    torch._dynamo.reset()
    iteration_graphs = []

    def backend(gm, example_inputs):
        if any("adapter" in n.name for n in gm.graph.nodes if n.op == "placeholder"):  # the iteration's inputs
            iteration_graphs.append(gm)
        return gm.forward

    model = perturbed(tiny_cfg).compile_stages(backend=backend)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.seq_len))
    with torch.autocast("cpu", torch.bfloat16):
        for r in (1, 5, 3, 2, 7):  # r ≤ k (s₀ = e, with gradients) and r > k (a detached state from no-grad steps)
            model(x, x, num_recur=r, bptt_k=2).backward()
        with torch.no_grad():
            model(x, x, num_recur=3)
            model(x, num_recur=4)
    # grad mode × whether the incoming state carries gradients, and evaluation: no dtype or aliasing variants
    assert len(iteration_graphs) <= 4
