"""Calibrated exits: the confidence bound, the fixed-sequence choice, the numbers against an independent scorer, and
`recurchat calibrate` → `--exit auto` in sample, eval and the server. Run: `pytest tests/eval/test_calibrate.py`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from server_support import post_once
from support import random_model, smoke_run

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.errors import UserError
from recurchat.eval.bpb import evaluate_bpb, evaluate_bpb_exit
from recurchat.eval.calibrate import GRIDS, calibrate, relative_loss
from recurchat.infer.engine import Engine, RecurParams


def test_relative_loss_is_the_ratio_of_sums_with_a_delta_method_bound():
    fixed = np.array([10.0, 12.0, 8.0, 10.0])
    loss, upper = relative_loss(fixed, fixed * 1.02)  # every segment loses exactly 2%
    assert loss == pytest.approx(0.02) and upper == pytest.approx(0.02)  # no spread: the bound is the estimate
    loss, upper = relative_loss(fixed, fixed + np.array([0.5, -0.1, 0.4, 0.0]))
    assert loss == pytest.approx(0.8 / 40)
    residual = np.array([0.5, -0.1, 0.4, 0.0]) - loss * fixed
    se = math.sqrt(4 / 3 * (residual ** 2).sum()) / 40
    assert upper == pytest.approx(loss + 1.6448536 * se)


@pytest.fixture(scope="module")
def scored(tiny_cfg_module):
    model = random_model(tiny_cfg_module, seed=7)
    engine = Engine(model, dtype="fp32")
    tokens = np.random.default_rng(0).integers(0, tiny_cfg_module.vocab_size, 600).astype(np.uint16)
    token_bytes = torch.ones(tiny_cfg_module.vocab_size, dtype=torch.long)
    return model, engine, tokens, token_bytes


@pytest.fixture(scope="module")
def tiny_cfg_module():
    from recurchat.config import ModelConfig
    return ModelConfig(vocab_size=256 + 64, d_model=64, n_head=4, n_kv_head=2, n_prelude=1, n_shared=2, n_coda=1,
                       mean_recur=3, r_max=8, seq_len=32)


def test_thresholds_are_tested_strictest_first_and_the_last_pass_is_chosen(scored):
    model, engine, tokens, token_bytes = scored
    result = calibrate(engine, tokens, token_bytes, "latent", 0.5, batch_size=8, max_tokens=512, log=lambda _: None)
    tested = result["tested"]
    assert [t["exit"] for t in tested] == [f"latent:{g:g}" for g in GRIDS["latent"][:len(tested)]]
    passed = [t["passed"] for t in tested]
    assert all(passed[:-1])  # the sequence stops at its first failure...
    if passed[-1]:
        assert len(tested) == len(GRIDS["latent"])  # ...or runs through the whole grid
    chosen = [t for t in tested if t["passed"]][-1]
    assert result["exit"] == chosen["exit"] and result["bpb_loss_upper_95"] <= 0.5
    # the same numbers as the independent scorers: fixed r̄ through the uncached forward, the exit through bpb eval
    assert result["bpb_fixed"] == pytest.approx(
        evaluate_bpb(model, tokens, token_bytes, 8, 32, 512, num_recur=3), rel=1e-5)
    bpb, mean_r = evaluate_bpb_exit(engine, tokens, token_bytes, 8, 32, 512,
                                    RecurParams(exit=chosen["exit"], max_recur=8))
    assert chosen["bpb"] == pytest.approx(bpb, rel=1e-5) and chosen["mean_recursions"] == pytest.approx(mean_r)
    assert chosen["bpb_loss"] == pytest.approx(chosen["bpb"] / result["bpb_fixed"] - 1, abs=1e-9)


def test_an_unreachable_target_is_a_user_error_naming_the_strictest_bound(scored):
    _, engine, tokens, token_bytes = scored
    with pytest.raises(UserError, match=r"no latent threshold keeps the bpb loss within 1e-07% .*latent:0.001"):
        calibrate(engine, tokens, token_bytes, "latent", 1e-9, batch_size=8, max_tokens=256, log=lambda _: None)
    for criterion, loss, message in (("argmax", 0.01, "cannot calibrate 'argmax'"), ("kl", 1.5, "fraction in")):
        with pytest.raises(UserError, match=message):
            calibrate(engine, tokens, token_bytes, criterion, loss)


def test_calibrate_then_exit_auto_in_sample_eval_and_server(tmp_path, small_text, capsys):
    run = smoke_run(tmp_path, small_text)
    assert main(["sample", "--ckpt", str(run), "-p", "The", "--exit", "auto", "--max-tokens", "3"]) == 2
    assert "has no calibrated exit yet" in capsys.readouterr().err
    assert main(["calibrate", "--ckpt", str(run), "--criterion", "nope"]) == 2  # before loading anything
    assert main(["calibrate", "--ckpt", str(run), "--criterion", "latent", "--max-bpb-loss", "0.5",
                 "--eval-tokens", "256", "--dtype", "fp32"]) == 0
    saved = json.loads((checkpoint.resolve(run) / checkpoint.CALIBRATION_FILE).read_text())
    assert saved["exit"].startswith("latent:") and saved["bpb_loss_upper_95"] <= 0.5
    assert f"chosen: {saved['exit']}" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(run), "-p", "The", "--exit", "auto", "--max-tokens", "3"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(run), "--tasks", "bpb", "--recur", "2", "--exit", "auto",
                 "--eval-tokens", "128", "--quiet", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["exit"]) == [saved["exit"]]
    bench = tmp_path / "bench.json"
    assert main(["bench", "infer", "--ckpt", str(run), "--exit", "auto", "--tokens", "8", "--eval-tokens", "128",
                 "--json", str(bench)]) == 0
    res = json.loads(bench.read_text())
    assert res["exit"] == saved["exit"]
    assert res["exit_calibrated_speedup_b1"] == res["exit_speedup_b1"] == pytest.approx(
        res["decode_tok_s_b1_exit"] / res["decode_tok_s_b1"])
    assert res["exit_calibrated_bpb_delta"] == pytest.approx(res["bpb_exit"] / res["bpb_fixed"] - 1)
    body = {"model": "smoke", "prompt": "The", "max_tokens": 3, "recursion": {"exit": "auto"}}
    assert post_once(run, body).status_code == 200
    (checkpoint.resolve(run) / checkpoint.CALIBRATION_FILE).unlink()
    r = post_once(run, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "recursion.exit"
