"""End-to-end training: loss falls, exact resume, checkpoint round-trip, metrics, bad inputs.

Run: `pytest tests/train/test_trainer.py` (the cpu-tiny learning test is marked slow).
"""

import json

import pytest
import torch

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.model.flops import flops_per_token
from recurchat.model.recurrent import RecurrentLM

SMOKE = ["--preset", "cpu-smoke", "--quiet"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def test_smoke_run_writes_checkpoint_and_metrics(tmp_path, small_text):
    out = tmp_path / "run"
    assert main(["train", *SMOKE, "--data", str(small_text), "--out", str(out), "--max-steps", "12"]) == 0
    ck = checkpoint.resolve(out)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "state/trainer.json",
                 "state/optimizer.safetensors"):
        assert (ck / name).is_file(), name
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    cfg = checkpoint.load(out).model_cfg
    tokens = checkpoint.load(out).train_cfg.total_batch_tokens
    for m in steps:
        assert all(1 <= r <= 8 for r in m["r"]) and 0 < m["mfu"] < 1
        assert m["tok_s"] == pytest.approx(tokens / m["dt"])  # this step's tokens over its own wall time
        expect = sum(flops_per_token(cfg, r, 2, seq_len=cfg.seq_len) for r in m["r"]) / len(m["r"])  # bptt_k = 2
        assert m["flops_per_token"] == pytest.approx(expect)  # the mean over its micro-steps' depths
    evals = [m for m in metrics if "val_bpb" in m]
    assert evals and set(evals[-1]["val_bpb"]) == {"1", "2", "4"}
    # no temp directories left behind
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_checkpoint_round_trip(tmp_path, small_text):
    out = tmp_path / "run"
    main(["train", *SMOKE, "--data", str(small_text), "--out", str(out), "--max-steps", "3"])
    ck = checkpoint.load(out)  # run dir resolves to run/checkpoint
    model = RecurrentLM(ck.model_cfg)
    checkpoint.load_model_weights(model, ck)
    idx = torch.randint(0, ck.model_cfg.vocab_size, (1, 16))
    logits = model(idx)
    path2 = checkpoint.save(tmp_path / "copy", model, ck.model_cfg, ck.train_cfg, ck.tokenizer)
    ck2 = checkpoint.load(path2)
    model2 = RecurrentLM(ck2.model_cfg)
    checkpoint.load_model_weights(model2, ck2)
    assert torch.equal(model2(idx), logits)
    assert ck2.tokenizer.fingerprint() == ck.tokenizer.fingerprint()
    assert not ck2.has_state()


def test_exact_resume_fp32(tmp_path, small_text):
    """2N steps straight == N steps, resume, N steps: identical losses bit for bit (CPU, fp32)."""
    common = [*SMOKE, "--data", str(small_text), "--dtype", "fp32", "--max-steps", "8", "--eval-every", "3",
              "--state-init", "noise"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--out", str(split), "--stop-after", "4"]) == 0
    assert max(step_losses(split)) == 4
    assert main(["train", "--quiet", "--resume", str(split), "--out", str(split), "--stop-after", "0"]) == 0
    a, b = step_losses(straight), step_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # exact float equality
    wa = checkpoint.load(straight).weights
    wb = checkpoint.load(split).weights
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_crash_logs_each_step_once(tmp_path, small_text):
    """A run that crashed after logging steps past its last checkpoint: resuming rewrites those steps, once."""
    common = [*SMOKE, "--data", str(small_text), "--dtype", "fp32", "--max-steps", "6", "--eval-every", "0"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--out", str(crashed), "--stop-after", "3"]) == 0  # checkpoint at step 3
    with open(crashed / "metrics.jsonl", "a") as f:  # what the crashed process had logged after it
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n" + json.dumps({"step": 5, "loss": 99.0}) + "\n")
        f.write('{"step": 6, "lo')  # cut off mid-line
    assert main(["train", "--quiet", "--resume", str(crashed), "--out", str(crashed)]) == 0
    logged = [m["step"] for m in read_metrics(crashed) if "loss" in m]
    assert logged == list(range(1, 7))
    assert step_losses(crashed) == step_losses(straight)


def test_standard_twin_trains(tmp_path, small_text):
    out = tmp_path / "std"
    assert main(["train", *SMOKE, "--standard", "--data", str(small_text), "--out", str(out),
                 "--max-steps", "3"]) == 0
    ck = checkpoint.load(out)
    assert ck.model_cfg.n_shared == 0 and ck.model_cfg.n_prelude == 1 + 2 * 1


def test_iso_params_baseline_follows_the_overridden_recursive_model(tmp_path, small_text):
    out = tmp_path / "iso-params"
    assert main(["train", *SMOKE, "--standard", "iso-params", "--n-shared", "2", "--data", str(small_text),
                 "--out", str(out), "--max-steps", "2"]) == 0
    cfg = checkpoint.load(out).model_cfg
    assert (cfg.n_prelude, cfg.n_shared, cfg.n_coda) == (1 + 2, 0, 1)


@pytest.mark.slow
def test_cpu_tiny_loss_falls_on_embedded_corpus(tmp_path):
    out = tmp_path / "tiny"
    assert main(["train", "--preset", "cpu-tiny", "--quiet", "--out", str(out), "--max-steps", "50",
                 "--eval-every", "0", "--eval-tokens", "8192", "--warmup-steps", "5"]) == 0
    losses = step_losses(out)
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(46, 51)) / 5
    assert last < first - 1.5, (first, last)
