"""Recipes that keep depth working (issue 24): Parcae's constrained injection, the progressive loss's split, the
loss masked to what r iterations reach, noise in s₀, hints read out of every iteration, and the unrolled trajectory
the diagnostic reads.
Run: `pytest tests/model/test_depth_recipes.py`."""

import dataclasses

import pytest
import torch

from recurchat.config import ModelConfig, TrainConfig
from recurchat.errors import UserError
from recurchat.model.recurrent import RecurrentLM
from recurchat.train.optim import param_groups
from recurchat.train.recipes import progressive_split
from tests.support import perturbed


def test_parcae_injection_is_a_contraction_in_the_state_whatever_its_weights(tiny_cfg):
    torch.manual_seed(0)
    m = RecurrentLM(dataclasses.replace(tiny_cfg, adapter="parcae"))
    with torch.no_grad():
        m.adapter.log_a.normal_(0, 1.5)
        m.adapter.dt.normal_(0, 1.5)
    a_bar, delta = m.adapter.carry()
    assert ((a_bar >= 0) & (a_bar <= 1)).all() and (delta > 0).all()  # (0, 1) up to float rounding
    e, s, s2 = (torch.randn(2, 5, tiny_cfg.d_model) for _ in range(3))
    # linear in s with gain Ā per channel: the difference of two states shrinks channel by channel
    diff = m.adapter(e, s) - m.adapter(e, s2)
    assert torch.allclose(diff, a_bar * (s - s2), atol=1e-5)


def test_parcae_starts_as_e_plus_a_decayed_state_and_trains(tiny_cfg):
    m = RecurrentLM(dataclasses.replace(tiny_cfg, adapter="parcae"))
    e, s = torch.randn(2, 3, tiny_cfg.d_model), torch.randn(2, 3, tiny_cfg.d_model)
    assert torch.allclose(m.adapter(e, s), e + torch.exp(torch.tensor(-1.0)) * s, atol=1e-5)
    groups = param_groups(m)
    assert any(p is m.adapter.inject.weight for p in groups["matrix"])
    assert any(p is m.adapter.log_a for p in groups["scalar"]) and any(p is m.adapter.dt for p in groups["scalar"])
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    m(idx, idx, num_recur=3).backward()
    assert m.adapter.log_a.grad.abs().sum() > 0 and m.adapter.inject.weight.grad.abs().sum() > 0


def test_progressive_split_covers_every_n_and_k_and_is_seeded():
    r = 5
    splits = [progressive_split(0, micro, r) for micro in range(400)]
    assert all(0 <= n <= r - 1 and 1 <= k <= r - n for n, k in splits)
    assert {n for n, _ in splits} == set(range(r))
    assert {k for n, k in splits if n == 0} == set(range(1, r + 1))
    assert splits == [progressive_split(0, micro, r) for micro in range(400)]
    assert splits != [progressive_split(1, micro, r) for micro in range(400)]


def test_recipe_fields_are_validated():
    with pytest.raises(UserError, match="progressive_loss"):
        TrainConfig(progressive_loss=1.0).validate()
    with pytest.raises(UserError, match="loss_reach"):
        TrainConfig(loss_reach=-2).validate()
    with pytest.raises(UserError, match="hint_weight and hint_lag"):
        TrainConfig(hint_weight=-1.0).validate()
    with pytest.raises(UserError, match="hint_weight and hint_lag"):
        TrainConfig(hint_lag=-1).validate()
    with pytest.raises(UserError, match="unknown adapter"):
        ModelConfig(adapter="gated").validate()


def test_noise_state_init_draws_a_new_start_each_call(tiny_cfg):
    m = perturbed(RecurrentLM(dataclasses.replace(tiny_cfg, state_init="noise", state_noise_std=2.0)), seed=0)
    e = torch.zeros(2, 4, tiny_cfg.d_model)
    a, b = m.initial_state(e), m.initial_state(e)
    assert not torch.equal(a, b) and abs(a.std().item() - 2.0) < 0.3


def test_unroll_reads_out_the_forward_at_every_depth(tiny_cfg):
    m = perturbed(RecurrentLM(dataclasses.replace(tiny_cfg, state_norm=False)), seed=1)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    states, cos, sin = m.unroll(idx, 5)
    assert len(states) == 6
    with torch.no_grad():
        for r in (1, 3, 5):
            assert torch.allclose(m.tail_logits(states[r], cos, sin), m(idx, num_recur=r), atol=1e-5)
        assert not torch.allclose(m.tail_logits(states[1], cos, sin), m.tail_logits(states[5], cos, sin))


@pytest.mark.parametrize("lag, bptt_k, read", [(1, None, {2: 0, 3: 1, 4: 2, 5: 2}),
                                              (0, None, {1: 0, 2: 1, 3: 2, 4: 2, 5: 2}),
                                              (1, 2, {4: 2, 5: 2})])  # {iteration read out: hint column}
def test_hints_train_each_iteration_readout_on_its_step_of_the_path(tiny_cfg, lag, bptt_k, read):
    """The hint loss is the mean, over the iterations with gradients past the lag, of the readout of iteration i
    against hint column i − lag − 1 (the last column from there on); the answer's loss is the plain forward's."""
    m = perturbed(RecurrentLM(dataclasses.replace(tiny_cfg, state_norm=False)), seed=2)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    targets = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    hints = torch.randint(0, tiny_cfg.vocab_size, (2, 9, 3))
    hints[:, :4] = -1  # positions without a label have no hints
    loss, hint_loss = m(idx, targets, num_recur=5, bptt_k=bptt_k, hints=hints, hint_lag=lag)
    states, cos, sin = m.unroll(idx, 5)
    with torch.no_grad():
        expected = torch.stack([torch.nn.functional.cross_entropy(
            m.tail_logits(states[i], cos, sin).flatten(0, 1), hints[..., col].flatten(), ignore_index=-1)
            for i, col in read.items()]).mean()
        assert torch.allclose(loss, m(idx, targets, num_recur=5), atol=1e-5)
    assert torch.allclose(hint_loss, expected, atol=1e-5)
    hint_loss.backward()
    assert m.recur[0].mlp.c_fc.weight.grad.abs().sum() > 0


def test_hints_are_refused_where_there_is_nothing_to_read_out(tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 6))
    hints = torch.zeros(1, 6, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="recursive model and targets"):
        RecurrentLM(tiny_cfg.twin("iso-params"))(idx, idx, hints=hints)
    m = RecurrentLM(tiny_cfg)
    with pytest.raises(ValueError, match="recursive model and targets"):
        m(idx, hints=hints)
    _, none_read = m(idx, idx, num_recur=1, hints=hints)  # r = 1 with lag 1: no iteration past the lag
    _, all_ignored = m(idx, idx, num_recur=4, hints=torch.full_like(hints, -1))
    assert none_read.item() == 0 and all_ignored.item() == 0
