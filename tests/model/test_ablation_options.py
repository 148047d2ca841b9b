"""The model and training options the depth ablation varies: adapter init, state and sandwich norms, the shared
blocks' learning-rate scale, the iso-params twin, the r curriculum. Run: `pytest tests/model/test_ablation_options.py`.
"""

import dataclasses

import pytest
import torch

from recurchat.config import TrainConfig
from recurchat.errors import UserError
from recurchat.model.depth import DepthSampler
from recurchat.model.layers import norm
from recurchat.model.recurrent import RecurrentLM
from recurchat.train.optim import build_optimizers


def perturbed(cfg, **changes) -> RecurrentLM:
    """A model whose blocks are no longer identities (the adapter keeps its init)."""
    torch.manual_seed(0)
    m = RecurrentLM(dataclasses.replace(cfg, **changes))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "c_proj" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("init,e_part,s_part", [("e", 1.0, 0.0), ("s", 0.0, 1.0), ("mean", 0.5, 0.5)])
def test_adapter_init_sets_the_e_and_state_blocks(tiny_cfg, init, e_part, s_part):
    w = RecurrentLM(dataclasses.replace(tiny_cfg, adapter_init=init)).adapter.proj.weight
    d = tiny_cfg.d_model
    assert torch.equal(w[:, :d], torch.eye(d) * e_part)
    assert torch.equal(w[:, d:], torch.eye(d) * s_part)


def test_random_adapter_init_has_fan_in_std(tiny_cfg):
    torch.manual_seed(0)
    w = RecurrentLM(dataclasses.replace(tiny_cfg, d_model=64, n_head=2, n_kv_head=1,
                                        adapter_init="random")).adapter.proj.weight
    assert abs(w.std().item() - (1 / (2 * 64)) ** 0.5) < 0.01
    assert (w[:, :64] - torch.eye(64)).abs().max() > 0.5  # not the identity


def test_state_adapter_init_is_an_unrolled_net_fed_e_once(tiny_cfg):
    """adapter_init=s: iteration i reads only s_{i-1}, so r iterations = the shared stack applied r times to e."""
    m = perturbed(tiny_cfg, adapter_init="s", state_init="e", state_norm=False)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    cos, sin = m.rope(0, 8)
    e = m.run_prelude(idx, cos, sin)
    x = e
    for _ in range(3):
        for block in m.recur:
            x = block(x, cos, sin)
    _, state = m(idx, num_recur=3, return_state=True)
    assert torch.allclose(state, x, atol=1e-5)


def test_e_adapter_init_makes_r_irrelevant_at_init(tiny_cfg):
    """The reason to change it: with [I | 0] every iteration recomputes recur(e), so r = 1 and r = 8 agree."""
    m = perturbed(tiny_cfg, adapter_init="e")
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    assert torch.allclose(m(idx, num_recur=1), m(idx, num_recur=8), atol=1e-5)
    m = perturbed(tiny_cfg, adapter_init="mean")
    assert not torch.allclose(m(idx, num_recur=1), m(idx, num_recur=8), atol=1e-3)


def test_state_norm_gives_a_unit_rms_state_at_every_depth(tiny_cfg):
    m = perturbed(tiny_cfg, adapter_init="s", state_norm=True)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    for r in (1, 3, 9):
        _, state = m(idx, num_recur=r, return_state=True)
        assert torch.allclose(state.pow(2).mean(-1), torch.ones(2, 8), atol=1e-4)
        assert torch.allclose(state, norm(state), atol=1e-5)


def test_sandwich_norm_applies_to_shared_blocks_only(tiny_cfg):
    m = perturbed(tiny_cfg, sandwich_norm=True)
    assert all(b.sandwich for b in m.recur) and not any(b.sandwich for b in [*m.prelude, *m.coda])
    x = torch.randn(2, 8, tiny_cfg.d_model) * 7
    cos, sin = m.rope(0, 8)
    y = m.recur[0](x, cos, sin)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(2, 8), atol=1e-4)


def test_lr_shared_scale_sets_the_shared_blocks_muon_rate(tiny_cfg):
    m = RecurrentLM(tiny_cfg)
    muon = build_optimizers(m, TrainConfig(lr_matrix=0.02, lr_shared_scale=0.25))[0]
    rates = {id(p): g["lr"] for g in muon.param_groups for p in g["params"]}
    shared = [p for n, p in m.named_parameters() if n.startswith("recur.") and p.ndim == 2]
    others = [p for n, p in m.named_parameters() if n.startswith(("prelude.", "coda.", "adapter.")) and p.ndim == 2]
    assert shared and others
    assert {rates[id(p)] for p in shared} == {0.005} and {rates[id(p)] for p in others} == {0.02}


def test_iso_params_twin_has_the_same_blocks_applied_once(tiny_cfg):
    twin = tiny_cfg.twin("iso-params")
    distinct = tiny_cfg.n_prelude + tiny_cfg.n_shared + tiny_cfg.n_coda
    assert twin.n_shared == 0 and twin.n_prelude + twin.n_coda == distinct
    rec, std = RecurrentLM(tiny_cfg).num_params(), RecurrentLM(twin).num_params()
    assert std["total"] == rec["total"] - rec["adapter"]
    assert tiny_cfg.twin("iso-flops") == tiny_cfg.standard_twin()
    with pytest.raises(UserError, match="unknown standard baseline"):
        tiny_cfg.twin("iso-bytes")


def test_curriculum_fixed_depth_ramps_up_to_the_target():
    s = DepthSampler("fixed", mean=8, r_max=16, curriculum_steps=70)
    assert s.sample(0, 1) == [1] and s.sample(35, 1) == [5] and s.sample(70, 1) == [8] and s.sample(500, 1) == [8]


@pytest.mark.parametrize("changes,message", [({"adapter_init": "eye"}, "unknown adapter init")])
def test_bad_model_options_are_refused(tiny_cfg, changes, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(tiny_cfg, **changes).validate()


@pytest.mark.parametrize("changes,message", [({"lr_shared_scale": 0.0}, "lr_shared_scale"),
                                             ({"curriculum_frac": 1.5}, "curriculum_frac")])
def test_bad_train_options_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**changes).validate()


@pytest.mark.parametrize("std", [0.1, 3.0])
def test_noise_state_has_the_configured_scale(tiny_cfg, std):
    m = RecurrentLM(dataclasses.replace(tiny_cfg, state_init="noise", state_noise_std=std))
    e = torch.zeros(4, 64, tiny_cfg.d_model)
    torch.manual_seed(0)
    assert abs(m.initial_state(e).std().item() - std) < 0.05 * std
