"""`recurchat sweep`: grid and search parsing, the plan, a grid study with baselines and its summary, a TPE search,
resume after SIGKILL, two workers on one SQLite study, bad input. Run: `pytest tests/test_sweep.py`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.errors import UserError
from recurchat.sweep.space import SweepSpec, parse_grid, parse_search, plan
from recurchat.train.telemetry import read_records

SMOKE = ["--preset", "cpu-smoke", "--quiet", "--threads", "1"]


def summary(study: Path) -> dict:
    return json.loads((study / "summary.json").read_text())


def test_grid_values_take_the_field_types():
    grid = parse_grid("adapter_init=e,mean; state_norm=true,false;d_model=64;lr_matrix=0.01")
    assert grid == {"adapter_init": ["e", "mean"], "state_norm": [True, False], "d_model": [64], "lr_matrix": [0.01]}


def test_search_ranges_become_optuna_distributions():
    space = parse_search("lr_matrix=log:0.005..0.05;bptt_k=2..8;warmup_steps=int:0..20;adapter_init=e,s")
    assert space["lr_matrix"] == optuna.distributions.FloatDistribution(0.005, 0.05, log=True)
    assert space["bptt_k"] == optuna.distributions.IntDistribution(2, 8)
    assert space["warmup_steps"] == optuna.distributions.IntDistribution(0, 20)
    assert space["adapter_init"] == optuna.distributions.CategoricalDistribution(["e", "s"])


@pytest.mark.parametrize("grid,search,message", [
    ("nonsense=1", "", "unknown field"), ("d_model=abc", "", "not a valid int"), ("state_norm=maybe", "", "bool"),
    ("eval_recur=1,2", "", "cannot be swept"), ("d_model", "", "expected name=values"),
    ("", "lr_matrix=log:0..1", "empty range"), ("", "adapter_init=log:1..2", "bad range"),
    ("lr_matrix=0.01", "lr_matrix=log:0.005..0.05", "both in --grid and in --search")])
def test_bad_sweep_specs_are_refused(grid, search, message):
    with pytest.raises(UserError, match=message):
        SweepSpec("cpu-smoke", 4, grid, search).validate()


def test_plan_runs_each_baseline_once_per_regime():
    spec = SweepSpec("cpu-smoke", 4, "adapter_init=e,mean;bptt_k=1,2;d_model=32,64", standard=["iso-params"])
    trials = plan(spec)
    baselines = [t for t in trials if t["model"] == "iso-params"]
    # adapter_init and bptt_k only shape a recursive model; d_model shapes both
    assert baselines == [{"model": "iso-params", "d_model": 32}, {"model": "iso-params", "d_model": 64}]
    assert len([t for t in trials if t["model"] == "recursive"]) == 8


def test_grid_study_with_baselines_writes_summary_and_plots(tmp_path, small_text, capsys):
    study = tmp_path / "study"
    args = ["sweep", "--study", str(study), "--data", str(small_text), "--max-steps", "4", *SMOKE,
            "--grid", "adapter_init=e,mean", "--standard", "iso-params,iso-flops"]
    assert main(args) == 0
    result = summary(study)
    trials = result["trials"]
    assert [(t["model"], t["params"].get("adapter_init")) for t in trials] == [
        ("iso-params", None), ("iso-flops", None), ("recursive", "e"), ("recursive", "mean")]
    assert all(t["state"] == "COMPLETE" for t in trials)
    recursive = trials[2]
    assert sorted(recursive["bpb"], key=int) == ["1", "2", "4", "8"]  # 1, 2, r̄ = 2, 2r̄, 4r̄ = 8 = r_max
    logged = [r for r in read_records(study / recursive["run_dir"] / "metrics.jsonl") if r.get("val_bpb")][-1]
    assert logged["val_bpb"] == recursive["bpb"] and logged["step"] == 4
    assert recursive["depth_gain"] == pytest.approx(recursive["bpb"]["1"] / recursive["bpb"]["2"] - 1)
    assert recursive["baselines"] == {"iso-params": trials[0]["bpb"]["1"], "iso-flops": trials[1]["bpb"]["1"]}
    assert trials[0]["n_params"] < trials[1]["n_params"]
    for name in ("bpb_vs_r.png", "phi.png"):
        assert (study / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (study / name).stat().st_size > 5_000
    stored = json.loads((study / "sweep.json").read_text())  # the plan every worker runs
    assert stored["grid"] == "adapter_init=e,mean" and stored["standard"] == ["iso-params", "iso-flops"]
    assert "| 3 | recursive | adapter_init=mean |" in (study / "summary.md").read_text()
    # rerunning the finished study (same arguments, or none) trains nothing
    capsys.readouterr()
    assert main(args) == 0 and main(["sweep", "--study", str(study), "--quiet"]) == 0
    assert "[sweep] trial" not in capsys.readouterr().out
    assert len(optuna.load_study(study_name="recurchat", storage=f"sqlite:///{study}/study.db").trials) == 4
    # a different sweep in the same directory is refused
    assert main([*args[:-2], "--standard", "iso-params"]) == 2


def test_search_samples_inside_the_range(tmp_path, small_text):
    study = tmp_path / "search"
    assert main(["sweep", "--study", str(study), "--data", str(small_text), "--max-steps", "3", *SMOKE,
                 "--search", "lr_matrix=log:0.001..0.05", "--trials", "3"]) == 0
    trials = summary(study)["trials"]
    rates = [t["params"]["lr_matrix"] for t in trials]
    assert len(trials) == 3 and all(0.001 <= r <= 0.05 for r in rates) and len(set(rates)) == 3
    for t in trials:
        config = json.loads((checkpoint.resolve(study / t["run_dir"]) / "config.json").read_text())
        assert config["train"]["lr_matrix"] == t["params"]["lr_matrix"]


def sweep_process(study: Path, data: Path, steps: int, grid: str, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recurchat", "sweep", "--study", str(study), "--data", str(data),
           "--max-steps", str(steps), *SMOKE, "--grid", grid, "--heartbeat", "1", "--grace-period", "3", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_killed_sweep_resumes_the_trial_in_flight_and_skips_finished_ones(tmp_path, small_text):
    study = tmp_path / "killed"
    grid = "adapter_init=e,mean"
    proc = sweep_process(study, small_text, 60, grid)
    wait_for(study / "trials" / "0001" / "checkpoint" / "latest")  # trial 0 done, trial 1 mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_done = (study / "trials" / "0000" / "metrics.jsonl").read_text()
    state = checkpoint.resolve(study / "trials" / "0001") / "state" / "trainer.json"
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 60
    rerun = sweep_process(study, small_text, 60, grid)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    started = [line for line in out.splitlines() if line.startswith("[sweep] trial")]
    assert len(started) == 1 and "→ 0001" in started[0], out  # the killed trial, continued; trial 0 not rerun
    assert f"resumed from {study / 'trials' / '0001'}" in out
    assert (study / "trials" / "0000" / "metrics.jsonl").read_text() == first_done
    assert sorted(p.name for p in (study / "trials").iterdir()) == ["0000", "0001"]
    trials = summary(study)["trials"]
    assert [(t["run_dir"], t["state"]) for t in trials] == [("trials/0000", "COMPLETE"), ("trials/0001", "COMPLETE")]
    steps = [r["step"] for r in read_records(study / "trials" / "0001" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 61))


def test_two_workers_share_one_sqlite_study(tmp_path, small_text):
    study = tmp_path / "shared"
    grid = "adapter_init=e,s,mean,random"
    workers = [sweep_process(study, small_text, 30, grid) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    ran = [{line.split()[2] for line in out.splitlines() if line.startswith("[sweep] trial")} for out in outs]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # both worked, never on the same trial
    trials = summary(study)["trials"]
    assert sorted(t["params"]["adapter_init"] for t in trials) == ["e", "mean", "random", "s"]
    assert all(t["state"] == "COMPLETE" for t in trials)


def test_new_study_needs_preset_and_steps(tmp_path, capsys):
    assert main(["sweep", "--study", str(tmp_path / "s"), "--quiet"]) == 2
    assert "holds no study yet" in capsys.readouterr().err
    assert main(["sweep", "--study", str(tmp_path / "s"), "--preset", "cpu-smoke"]) == 2


def test_recursion_only_fields_leave_a_standard_model_unchanged(tiny_cfg):
    """The fields a baseline is trained once for really are ignored without shared blocks."""
    import dataclasses

    import torch

    from recurchat.config import TrainConfig
    from recurchat.model.recurrent import RecurrentLM
    from recurchat.sweep.space import RECURSION_ONLY

    other = {"adapter": "add", "adapter_init": "random", "state_init": "noise", "state_noise_std": 3.0,
             "state_norm": True, "sandwich_norm": True, "r_max": 3}
    assert set(other) | {f.name for f in dataclasses.fields(TrainConfig)} >= RECURSION_ONLY
    std = tiny_cfg.twin("iso-params")
    idx = torch.randint(0, std.vocab_size, (1, 8))
    torch.manual_seed(0)
    reference = RecurrentLM(std)(idx)
    torch.manual_seed(0)
    assert torch.equal(RecurrentLM(dataclasses.replace(std, **other))(idx), reference)


def test_probe_study_scores_extrapolation_and_tabulates_accuracies(tmp_path):
    study = tmp_path / "probe"
    assert main(["sweep", "--study", str(study), "--preset", "probe", "--quiet", "--max-steps", "40",
                 "--data", "probe:parity:1-4", "--grid", "attn_window=0,2", "--standard", "iso-params"]) == 0
    trials = summary(study)["trials"]
    assert sorted(t["model"] for t in trials) == ["iso-params", "iso-params", "recursive", "recursive"]
    assert all(t["state"] == "COMPLETE" for t in trials)  # attn_window shapes the baseline too: one per value
    for t in trials:
        depths = {"1", "2", "6", "12", "24"} if t["model"] == "recursive" else {"1"}
        assert set(t["acc"]) == set(t["acc_long"]) == depths
        r = "24" if t["model"] == "recursive" else "1"
        finished = optuna.load_study(study_name="recurchat", storage=f"sqlite:///{study / 'study.db'}").trials
        assert next(f for f in finished if f.number == t["number"]).value == pytest.approx(1 - t["acc_long"][r])
    md = (study / "summary.md").read_text()
    assert "Label accuracy on the trained levels / on the held-out levels" in md and "attn_window=2" in md
