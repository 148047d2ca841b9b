"""Exit criteria on crafted logits and states. Run: `pytest tests/infer/test_exit.py`."""

import math

import pytest
import torch

from recurchat.errors import UserError
from recurchat.infer.exit import ExitCriterion, ExitTracker


def tracker(spec, n=2):
    return ExitTracker(ExitCriterion.parse(spec), n, torch.device("cpu"))


def test_kl_exits_row_whose_distribution_stopped_moving():
    t = tracker("kl:0.01")
    state = torch.zeros(2, 4)
    a = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0]])
    b = torch.tensor([[5.0, 0, 0, 0], [0.0, 5, 0, 0]])  # row 0 unchanged, row 1 flipped
    assert t.update(1, state, a).tolist() == [False, False]  # no previous iteration yet
    assert t.update(2, state, b).tolist() == [True, False]


def test_kl_value_matches_definition():
    t = tracker("kl:1.0", n=1)
    p, q = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.5, 1.0, 2.0]])
    t.update(1, torch.zeros(1, 1), q)
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    kl = float((lp.exp() * (lp - lq)).sum())
    assert t.update(2, torch.zeros(1, 1), p).item() == (kl < 1.0)
    t2 = tracker(f"kl:{kl * 0.99}", n=1)
    t2.update(1, torch.zeros(1, 1), q)
    assert not t2.update(2, torch.zeros(1, 1), p).item()


def test_entropy_delta():
    t = tracker("entropy:0.1")
    flat, peaked = torch.zeros(1, 8), torch.tensor([[9.0] + [0.0] * 7])
    t.update(1, torch.zeros(2, 1), torch.cat([flat, flat]))
    # same entropy as before for row 0; row 1 became peaked (entropy drops by ~ln 8)
    assert t.update(2, torch.zeros(2, 1), torch.cat([flat, peaked])).tolist() == [True, False]


def test_latent_relative_change():
    t = tracker("latent:0.1")
    s1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s2 = torch.tensor([[1.05, 0.0], [0.0, 1.0]])
    assert t.update(1, s1, None).tolist() == [False, False]
    assert t.update(2, s2, None).tolist() == [True, False]


def test_cosine_ignores_a_change_of_scale_that_latent_sees():
    s1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s2 = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # row 0 only grew; row 1 turned by 45°
    t = tracker("cosine:0.01")
    assert t.update(1, s1, None).tolist() == [False, False]
    assert t.update(2, s2, None).tolist() == [True, False]
    assert tracker("latent:0.01").update(1, s1, None).tolist() == [False, False]
    t = tracker("cosine:0.3")  # 1 − cos 45° = 0.293
    t.update(1, s1, None)
    assert t.update(2, s2, None).tolist() == [True, True]


def test_gate_reads_s0_at_the_first_iteration_and_can_stop_there():
    from recurchat.model.exit_gate import ExitGate

    torch.manual_seed(0)
    gate = ExitGate(d_model=4, max_iterations=3).eval()
    s0, s1, s2 = (torch.randn(5, 4) for _ in range(3))
    with torch.no_grad():
        p1, p2 = torch.sigmoid(gate(s1, s0, 1)), torch.sigmoid(gate(s2, s1, 2))
    threshold = float(p1.median())
    t = ExitTracker(ExitCriterion.parse(f"gate:{threshold}"), 5, torch.device("cpu"), gate, s0)
    with torch.no_grad():
        assert t.update(1, s1, None).tolist() == (p1 >= threshold).tolist()
        assert t.update(2, s2, None).tolist() == (p2 >= threshold).tolist()
    with pytest.raises(UserError, match="needs this checkpoint's exit gate"):
        tracker("gate:0.5")


def test_argmax_streak_and_keep():
    t = tracker("argmax:2", n=3)
    L = lambda *ids: torch.nn.functional.one_hot(torch.tensor(ids), 4).float() * 5  # noqa: E731
    z = torch.zeros(3, 1)
    assert t.update(1, z, L(0, 1, 2)).tolist() == [False] * 3
    assert t.update(2, z, L(0, 1, 3)).tolist() == [False] * 3
    assert t.update(3, z, L(0, 2, 3)).tolist() == [True, False, False]
    t.keep(torch.tensor([False, True, True]))
    assert t.update(4, z[:2], L(2, 3)).tolist() == [False, True]


def test_fixed():
    t = tracker("fixed:3")
    z = torch.zeros(2, 1)
    assert not t.update(2, z, None).any() and t.update(3, z, None).all()


@pytest.mark.parametrize("spec", ["kl", "kl:x", "nope:1", "argmax:0", "argmax:1.5", "fixed:0", "kl:-1", "gate:0",
                                  "gate:1.5"])
def test_bad_specs(spec):
    with pytest.raises(UserError):
        ExitCriterion.parse(spec)


def test_roundtrip_str():
    assert str(ExitCriterion.parse("kl:0.001")) == "kl:0.001" and str(ExitCriterion.parse("argmax:3")) == "argmax:3"
    assert not ExitCriterion.parse("latent:0.1").needs_logits and ExitCriterion.parse("kl:1").needs_logits
    assert math.isclose(ExitCriterion.parse("entropy:1e-3").value, 1e-3)
