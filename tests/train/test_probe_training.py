"""Probe runs on the ordinary trainer: `recurchat train --preset probe --data probe:NAME:LO-HI` learns, resumes
exactly, and masks labels beyond reach. Run: `pytest tests/train/test_probe_training.py`."""

import json

import pytest
import torch

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.data.tasks.probes import parse_probe
from recurchat.errors import UserError
from recurchat.train.spec import init_spec, pretrain_spec, resume_spec
from recurchat.train.trainer import batch_for, setup, train


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_probe_run_learns_parity_at_its_mean_depth(tmp_path):
    run = tmp_path / "parity"
    assert main(["train", "--preset", "probe", "--quiet", "--data", "probe:parity:1-4", "--out", str(run),
                 "--max-steps", "300", "--eval-every", "100", "--eval-recur", "1,6", "--eval-tokens", "16384"]) == 0
    evals = [r for r in records(run) if "val_acc" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[-1]["val_acc"]["6"] >= 0.95  # chance is 0.5
    assert set(evals[-1]["val_acc_long"]) == {"1", "6"}  # lengths 5..8, never trained
    ck = checkpoint.load(run)
    assert ck.tokenizer.fingerprint() == parse_probe("probe:parity:1-4").tokenizer().fingerprint()


def test_probe_run_resumes_bit_for_bit_in_fp32(tmp_path):
    over = {"data": "probe:s3:1-4", "dtype": "fp32", "max_steps": 6, "eval_every": 0, "seed": 3,
            "progressive_loss": 0.5, "loss_reach": 1}
    full = tmp_path / "full"
    train(pretrain_spec("probe", full, train=over), progress=False)
    half = tmp_path / "half"
    train(pretrain_spec("probe", half, train={**over, "stop_after": 3}), progress=False)
    train(resume_spec(half, half, train={"stop_after": 0}), progress=False)
    losses = [[r["loss"] for r in records(run) if "loss" in r] for run in (full, half)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_labels_beyond_reach_are_masked_at_each_r(tmp_path):
    run = setup(pretrain_spec("probe", tmp_path / "reach", train={"loss_reach": 0, "eval_every": 0}), progress=False)
    x, y, hints = batch_for(run, 3, False)
    labelled = (y >= 0).sum(dim=1)
    assert torch.equal(labelled, torch.full_like(labelled, 3))  # difficulties 1..3 only
    assert hints is None  # hint_weight 0 (and parity has none)
    run.telemetry.close()


def test_a_standard_model_trains_on_every_label_whatever_the_reach(tmp_path):
    run = setup(pretrain_spec("probe", tmp_path / "std", standard="iso-params", train={"loss_reach": 0,
                                                                                       "eval_every": 0}),
                progress=False)
    x, y, _ = batch_for(run, 1, False)
    assert torch.equal((y >= 0).sum(dim=1), torch.full((x.size(0),), 8))  # all of parity:1-8
    run.telemetry.close()


def test_probe_that_does_not_fit_the_model_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="seq_len"):
        setup(pretrain_spec("probe", tmp_path / "long", model={"seq_len": 32}, train={"data": "probe:parity:1-40"}),
              progress=False)
    with pytest.raises(UserError, match="vocab_size"):
        setup(pretrain_spec("probe", tmp_path / "vocab", model={"vocab_size": 16}, train={"data": "probe:chase:1-2"}),
              progress=False)
    with pytest.raises(UserError, match="no label of probe:parity:3-8 is within reach"):
        setup(pretrain_spec("probe", tmp_path / "reach", train={"data": "probe:parity:3-8", "loss_reach": 1}),
              progress=False)
    with pytest.raises(UserError, match="--hint-weight needs a recursive model and a probe with intermediate"):
        setup(pretrain_spec("probe", tmp_path / "hint", train={"data": "probe:parity:1-8", "hint_weight": 1.0}),
              progress=False)
    with pytest.raises(UserError, match="not probe:chase:1-2 on a standard model"):
        setup(pretrain_spec("probe", tmp_path / "hint", standard="iso-flops", train={"data": "probe:chase:1-2",
                                                                                     "hint_weight": 1.0}),
              progress=False)
    with pytest.raises(UserError, match="--hint-weight needs probe data"):
        setup(pretrain_spec("cpu-smoke", tmp_path / "hint", train={"hint_weight": 1.0}), progress=False)


def test_hinted_chase_run_hands_the_model_each_query_path_and_learns_look_ups(tmp_path):
    """`--hint-weight` on pointer chasing: the trainer's batch carries the probe's hints, the loss adds their
    readouts, and direct look-ups are learned (the first stage of the speedrun's curriculum, cut short)."""
    run = tmp_path / "chase"
    assert main(["train", "--preset", "probe", "--quiet", "--data", "probe:chase:1-1", "--attn-window", "0",
                 "--n-prelude", "0", "--n-coda", "0", "--lr-matrix", "0.05", "--lr-embed", "0.12", "--lr-head",
                 "0.01", "--hint-weight", "1", "--max-steps", "400", "--eval-every", "400", "--eval-recur", "6",
                 "--eval-tokens", "16384", "--out", str(run)]) == 0
    assert records(run)[-1]["val_acc"]["6"] >= 0.9  # chance 0.1
    stage = setup(init_spec(run, tmp_path / "next", train={"data": "probe:chase:1-2"}), progress=False)
    assert stage.spec.train.hint_weight == 1.0  # a stage started from the last keeps its recipe
    x, y, hints = batch_for(stage, 6, False)
    assert hints.shape == (*x.shape, 8) and torch.equal(hints[..., -1][y >= 0], y[y >= 0])
    stage.telemetry.close()
