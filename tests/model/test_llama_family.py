"""The Llama-family block fields of ModelConfig, one by one, and that the nanochat defaults compute as before.

Run: `pytest tests/model/test_llama_family.py`.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from support import random_model

from recurchat.config import ModelConfig
from recurchat.errors import UserError
from recurchat.model.layers import MLP, apply_rotary, rotary_tables
from recurchat.model.recurrent import RecurrentLM
from recurchat.train.optim import param_groups

CFG = ModelConfig(vocab_size=320, d_model=64, n_head=4, n_kv_head=2, n_prelude=1, n_shared=2, n_coda=1,
                  mean_recur=3, r_max=8, seq_len=32)
X = torch.arange(24).reshape(2, 12) * 13 % 320


def logits(cfg: ModelConfig, seed: int = 3, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return random_model(cfg, seed)(x, num_recur=3)


def test_nanochat_defaults_compute_what_they_computed_before_the_llama_fields():
    # values printed by this model before model/layers.py knew of any Llama field (commit 1002f9e)
    y = logits(CFG)
    assert torch.allclose(y[0, -1, :6], torch.tensor([6.45248, 2.56183, 0.47018, 1.58105, 2.03894, 1.75697]),
                          atol=1e-4)
    assert abs(y.abs().mean().item() - 1.892839) < 1e-4


def test_llama_rope_rotates_by_plus_theta_as_transformers_rotate_half():
    cos, sin = rotary_tables(16, 8, 500.0, "llama")
    x = torch.randn(1, 16, 2, 8)
    half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)  # transformers' rotate_half
    c, s = torch.cat((cos, cos), -1), torch.cat((-sin, -sin), -1)  # the angle's sin, as transformers tabulates it
    assert torch.allclose(apply_rotary(x, cos, sin), x * c + half * s, atol=1e-6)
    ours = rotary_tables(16, 8, 500.0, "nanochat")
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], -sin)


def test_swiglu_is_down_of_silu_gate_times_up_with_its_own_hidden_size():
    mlp = MLP(8, 12, "swiglu")
    assert tuple(mlp.c_fc.weight.shape) == (24, 8) and tuple(mlp.c_proj.weight.shape) == (8, 12)
    x = torch.randn(3, 8)
    gate, up = mlp.c_fc.weight[:12], mlp.c_fc.weight[12:]
    assert torch.allclose(mlp(x), F.silu(x @ gate.T) * (x @ up.T) @ mlp.c_proj.weight.T, atol=1e-6)
    cfg = dataclasses.replace(CFG, mlp="swiglu", mlp_hidden=40)
    assert RecurrentLM(cfg).prelude[0].mlp.c_proj.in_features == 40 == cfg.mlp_width


def test_without_qk_norm_the_scale_of_queries_matters():
    def attn_out(qk_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        m = random_model(dataclasses.replace(CFG, qk_norm=qk_norm), seed=1)
        block = m.prelude[0]
        x, (cos, sin) = torch.randn(1, 10, 64), m.rope(0, 10)
        with torch.no_grad():
            before = block.attn(x, cos, sin)
            block.attn.c_q.weight.mul_(3.0)
            return before, block.attn(x, cos, sin)
    same = attn_out(True)
    assert torch.allclose(*same, atol=1e-5)  # QK-norm: a query's scale is normalised away
    a, b = attn_out(False)
    assert (a - b).abs().max() > 1e-2


def test_tied_embeddings_share_one_matrix_saved_and_optimized_once():
    cfg = dataclasses.replace(CFG, tie_embeddings=True, final_norm_gain=True)
    m = RecurrentLM(cfg)
    assert m.lm_head is None and m.head_weight is m.embed.weight
    assert "lm_head.weight" not in m.state_dict() and "final_gain" in m.state_dict()
    groups = param_groups(m)
    assert groups["embed"] == [m.embed.weight] and groups["head"] == [] and m.final_gain in groups["scalar"]
    loss = m(X[:, :-1], X[:, 1:])
    loss.backward()
    assert m.embed.weight.grad is not None and m.final_gain.grad.abs().sum() > 0
    assert m.num_params()["total"] == sum(p.numel() for p in m.parameters())


def test_final_norm_gain_scales_the_normalised_state_before_the_head():
    m = random_model(dataclasses.replace(CFG, final_norm_gain=True))
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        m.final_gain.copy_(torch.linspace(0.5, 2.0, 64))
        expected = F.rms_norm(x, (64,)) * m.final_gain @ m.lm_head.weight.T
        assert torch.allclose(m.head(x), 15.0 * torch.tanh(expected / 15.0), atol=1e-5)


def test_norm_epsilon_and_the_embedding_norm_change_what_blocks_see():
    base = logits(dataclasses.replace(CFG, embed_norm=False))
    assert (base - logits(CFG)).abs().max() > 1e-3  # without it the embedding's own scale reaches the blocks
    big_eps = logits(dataclasses.replace(CFG, embed_norm=False, norm_eps=10.0))
    assert (base - big_eps).abs().max() > 1e-3
    assert torch.allclose(base, logits(dataclasses.replace(CFG, embed_norm=False, norm_eps=1e-12)), atol=1e-4)


@pytest.mark.parametrize("field, value, problem", [("mlp", "gelu", "unknown mlp 'gelu'"),
                                                    ("rope_convention", "gptj", "unknown rope convention"),
                                                    ("mlp_hidden", -1, "mlp_hidden and norm_eps")])
def test_bad_family_fields_are_user_errors(field, value, problem):
    with pytest.raises(UserError, match=problem):
        dataclasses.replace(CFG, **{field: value}).validate()
