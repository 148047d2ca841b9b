"""The learned exit gate: its training examples equal the model's own forward, the engine stops where the gate says
(batched as one at a time), fitting learns a rule, and `recurchat exit-train` → gate:P / calibrate / the server.
Run: `pytest tests/infer/test_gate.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from server_support import post_once
from support import random_model, smoke_run

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams
from recurchat.model.exit_gate import ExitGate, settled, trajectory
from recurchat.train.exit_gate import auc, fit_gate, judge, safe_labels

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
PROMPTS = [[5, 9, 2, 7], [11, 3], [1, 2, 3, 4, 5, 6], [8], [40, 41, 42], [17, 18]]


def test_trajectory_gives_the_forward_states_the_kl_to_the_deepest_distribution_and_the_answers(tiny_cfg):
    model = random_model(tiny_cfg, seed=3)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    states, kl, tops = trajectory(model, idx, depth=5)
    assert states.shape == (6, 2, 12, tiny_cfg.d_model) and kl.shape == tops.shape == (5, 2, 12)
    with torch.no_grad():
        deep = torch.log_softmax(model(idx, num_recur=5), dim=-1)
        for r in (1, 3, 5):
            logits, state = model(idx, num_recur=r, return_state=True)
            torch.testing.assert_close(states[r], state, atol=1e-5, rtol=1e-5)
            logp = torch.log_softmax(logits, dim=-1)
            torch.testing.assert_close(kl[r - 1], (deep.exp() * (deep - logp)).sum(-1).clamp_min(0), atol=1e-5,
                                       rtol=1e-4)
            assert torch.equal(tops[r - 1], logits.argmax(dim=-1))
    assert float(kl[-1].abs().max()) < 1e-5 and float(kl[0].mean()) > 1e-3  # depth matters in this model


def rigged_gate(cfg, stop_from: int) -> ExitGate:
    """A gate that ignores the state: P(safe) ≈ 0 before iteration `stop_from`, ≈ 1 from it on."""
    gate = ExitGate(cfg.d_model, cfg.r_max, hidden=4)
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()
        gate.step_bias.weight[:, 0] = torch.tensor([1.0 if i + 1 >= stop_from else 0.0 for i in range(cfg.r_max)])
        gate.out.weight[0, 0], gate.out.bias[0] = 40.0, -20.0
    return gate.eval()


@pytest.mark.parametrize("stop_from", [1, 3, 8])
def test_a_gate_that_opens_at_iteration_k_decodes_exactly_like_fixed_depth_k(tiny_cfg, stop_from):
    model = random_model(tiny_cfg, seed=4)
    engine = Engine(model, dtype="fp32", exit_gate=rigged_gate(tiny_cfg, stop_from))
    gated = engine.generate(PROMPTS, GREEDY, RecurParams(exit="gate:0.5", prefill_recur=stop_from))
    fixed = engine.generate(PROMPTS, GREEDY, RecurParams(num_recur=stop_from))
    assert [g.tokens for g in gated] == [f.tokens for f in fixed]
    assert {d for g in gated for d in g.depths[1:]} == {stop_from}  # depths[0] is the prefill's


def test_batched_gate_exits_equal_one_at_a_time_and_rows_stop_at_different_depths(tiny_cfg):
    model = random_model(tiny_cfg, seed=5)
    torch.manual_seed(1)
    gate = ExitGate(tiny_cfg.d_model, tiny_cfg.r_max, hidden=16).eval()
    states = trajectory(model, torch.randint(0, tiny_cfg.vocab_size, (4, 16)), depth=tiny_cfg.r_max)[0]
    with torch.no_grad():
        probs = torch.sigmoid(gate(states[2], states[1], 2))
    recur = RecurParams(exit=f"gate:{float(probs.median()):.6f}", max_recur=tiny_cfg.r_max)
    engine = Engine(model, dtype="fp32", exit_gate=gate)
    batched = engine.generate(PROMPTS, GREEDY, recur)
    alone = [engine.generate([p], GREEDY, recur)[0] for p in PROMPTS]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert [g.depths for g in batched] == [g.depths for g in alone]
    assert len({d for g in batched for d in g.depths[1:]}) >= 2


def test_fit_gate_learns_a_rule_of_state_and_iteration_and_judge_reports_it():
    def examples(n, seed):
        g = torch.Generator().manual_seed(seed)
        state, prev = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
        step = torch.randint(1, 5, (n,), generator=g)
        safe = (state[:, 0] > 0) | (step >= 3)  # a direction of the state early on, always from iteration 3
        return state, prev, step, torch.where(safe, 0.0, 1.0)  # "kl": 0 where safe, 1 nat where not

    torch.manual_seed(0)
    gate = ExitGate(8, 4, hidden=16)
    train = examples(4000, 0)
    fit_gate(gate, train, safe_labels(train, "kl", 0.5).float(), steps=300, batch=512, lr=1e-2)
    held = examples(2000, 1)
    figures = judge(gate, held, safe_labels(held, "kl", 0.5))
    assert figures["accuracy"] > 0.95 and figures["auc"] > 0.98
    assert figures["by_iteration"]["3"]["safe_rate"] == 1.0 and figures["by_iteration"]["4"]["mean_prob"] > 0.9
    assert 0.3 < figures["by_iteration"]["1"]["safe_rate"] < 0.7


def test_settled_is_true_from_the_iteration_after_which_the_answer_never_changes_and_labels_use_it():
    tops = torch.tensor([[3, 1, 2], [3, 2, 2], [5, 2, 2], [3, 2, 2]])  # [iterations, labels]
    expect = torch.tensor([[False, False, True], [False, True, True], [False, True, True], [True, True, True]])
    assert torch.equal(settled(tops), expect)  # label 0 returns to 3 only at the last iteration
    examples = (None, None, None, torch.zeros(4, 3), settled(tops))
    assert torch.equal(safe_labels(examples, "answer", 0.01), expect)
    assert bool(safe_labels(examples, "kl", 0.01).all())


def test_auc_counts_pairs_ordered_right_and_ties_as_half():
    label = torch.tensor([False, False, True, True])
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), label) == 1.0
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), label) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), label) == 0.5
    assert auc(torch.tensor([0.1, 0.6, 0.6, 0.9]), label) == pytest.approx(3.5 / 4)
    assert np.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))


def test_exit_train_then_gate_in_sample_calibrate_and_the_server(tmp_path, small_text, capsys):
    run = smoke_run(tmp_path, small_text)
    assert main(["sample", "--ckpt", str(run), "-p", "The", "--exit", "gate:0.5", "--max-tokens", "3"]) == 2
    assert "needs this checkpoint's exit gate; run recurchat exit-train" in capsys.readouterr().err
    assert main(["exit-train", "--ckpt", str(run), "--tau", "0.001", "--deep-recur", "4", "--train-tokens", "256",
                 "--eval-tokens", "128", "--steps", "20", "--dtype", "fp32"]) == 0
    assert "exit gate: held-out accuracy" in capsys.readouterr().out
    gate = checkpoint.load_exit_gate(run)
    assert gate is not None and gate.max_iterations == 4
    assert main(["sample", "--ckpt", str(run), "-p", "The", "--exit", "gate:0.5", "--max-tokens", "3"]) == 0
    assert main(["calibrate", "--ckpt", str(run), "--criterion", "gate", "--max-bpb-loss", "0.5",
                 "--eval-tokens", "256", "--dtype", "fp32"]) == 0
    assert checkpoint.calibrated_exit(run).startswith("gate:")
    body = {"model": "smoke", "prompt": "The", "max_tokens": 3, "recursion": {"exit": "gate:0.5"}}
    assert post_once(run, body).status_code == 200
    gate_file = checkpoint.resolve(run) / checkpoint.EXIT_GATE_FILE
    gate_file.write_bytes(b"not safetensors")
    assert main(["sample", "--ckpt", str(run), "-p", "The", "--exit", "gate:0.5", "--max-tokens", "3"]) == 2
    assert "is not an exit gate" in capsys.readouterr().err
    gate_file.unlink()
    r = post_once(run, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "recursion.exit"
