"""`recurchat speedrun --preset cpu-smoke`: every stage, the report card, and resuming by skipping finished stages.

Run: `pytest tests/test_speedrun.py`.
"""

import json

import pytest

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.train.trainer import train_or_resume

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_speedrun_smoke_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "sr"
    assert main(["speedrun", "--preset", "cpu-smoke", "--out", str(out)]) == 0
    stages = json.loads((out / "stages.json").read_text())
    models = ("recursive", "standard", "iso-params")
    probe_stages = [*(f"probe parity {m}" for m in models), "calibrate probe parity",
                    *(f"eval probe parity {m}" for m in models),
                    *(stage for m in models for stage in (f"probe chase {m} 1-1", f"probe chase {m}")),
                    "calibrate probe chase", *(f"eval probe chase {m}" for m in models)]
    assert list(stages) == [f"{stage} {m}" for stage in ("pretrain", "sft", "eval") for m in models] + probe_stages
    # the chase curriculum: each model's second stage starts from the weights of its first
    printed = capsys.readouterr().out
    for m in models:
        assert f"initialised from {out / 'probes' / f'chase-{m}-1-1'}" in printed, m
    # hints from the second stage on, for the recursive model only
    hint_weights = {run.name: checkpoint.load(run).train_cfg.hint_weight for run in (out / "probes").glob("chase-*")}
    assert hint_weights == {"chase-recursive-1-1": 0.0, "chase-recursive": 1.0, "chase-standard-1-1": 0.0,
                            "chase-standard": 0.0, "chase-iso-params-1-1": 0.0, "chase-iso-params": 0.0}
    report = (out / "report.md").read_text()
    assert report.index("## Depth that does work: the probes") < report.index("| model | params | inference")
    for section in ("| parity:1-4 | recursive |", "| parity:1-4 | iso-FLOP twin |", "| parity:1-4 | iso-params |",
                    "![parity:1-4: accuracy by difficulty × r](heatmap-parity.png)", "| chase:1-2 | iso-params |",
                    "`chase:1-2`: a curriculum, chains of 1-1 for 20, then 1-2 for 20 steps",
                    "from the second stage on the recursive model also learns from hints (`--hint-weight 1`",
                    "![chase:1-2: accuracy by difficulty × r](heatmap-chase.png)",
                    "| model | params | inference FLOPs/token", "At r̄ = 2 the recursive base model's held-out bpb",
                    "Going from r̄ = 2 to 4r̄ = 8 recursions", "recursions per token per extra hop",
                    "After SFT its plain-text bpb is", "## Models", "## Loss curves", "## Wall time per stage",
                    "## Machine", "## Evaluation", "Standard model (baseline)"):
        assert section in report, section
    assert "nan" not in report.lower()
    for png in ("heatmap-parity.png", "loss_curves.png", "eval/acc_vs_r.png", "eval/bpb_vs_r.png", "eval/pareto.png",
                "eval/depth_vs_difficulty.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
        assert f"]({png})" in report, png
    rec, std, iso = (json.loads((out / f"eval-{m}.json").read_text()) for m in models)
    assert set(rec["tasks"]["bpb"]) == {"1", "2", "4", "8"} and set(std["tasks"]["bpb"]) == {"1"}
    assert set(rec["acc_by_difficulty"]["chain:1-4"]["8"]) == {"1", "2", "3", "4"}  # trained 1..2, held out 3..4
    assert iso["params"] < rec["params"] < std["params"]  # shared weights: fewer than the twin, adapter on top
    probe = [json.loads((out / f"eval-probe-parity-{m}.json").read_text()) for m in models]
    assert set(probe[0]["acc_by_difficulty"]["probe:parity:1-8"]) >= {"1", "2", "6", "12", "24"}
    assert [set(p["tasks"]["probe:parity:1-8"]) for p in probe[1:]] == [{"1"}, {"1"}]
    assert list(probe[0]["trajectory"]["probe:parity:1-8"]["settle"]) == [str(d) for d in range(1, 9)]
    chase = json.loads((out / "eval-probe-chase-recursive.json").read_text())
    assert set(chase["acc_by_difficulty"]["probe:chase:1-4"]["6"]) == {"1", "2", "3", "4"}  # 1..2 trained
    bases = [json.loads((out / f"eval-base-{m}.json").read_text()) for m in models]
    assert [set(b["tasks"]["bpb"]) for b in bases] == [{"1", "2", "4", "8"}, {"1"}, {"1"}]
    capsys.readouterr()
    # a second run finds every stage done and only redraws the report
    assert main(["speedrun", "--preset", "cpu-smoke", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skipping") == 9 + len(probe_stages)
    assert json.loads((out / "stages.json").read_text()) == stages


def test_an_interrupted_training_stage_resumes_from_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "recursive"
    # the stage as a crash leaves it: a checkpoint at step 12 of 30 (and steps logged after it)
    assert main(["train", "--preset", "cpu-smoke", "--quiet", "--out", str(run), "--max-steps", "30",
                 "--stop-after", "12", "--eval-every", "0"]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 13, "loss": 99.0}) + "\n")
    capsys.readouterr()
    train_or_resume(run, lambda: pytest.fail("an interrupted stage must resume, not start over"))
    assert "at step 12" in capsys.readouterr().out
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, 31))


KILLED_SPEEDRUN = """
import os, signal, sys
import recurchat.checkpoint as ck
import recurchat.speedrun.stages as sr
mode, out = sys.argv[1], sys.argv[2]
real_latest, real_write = ck.atomic_write_text, sr.atomic_write_text

def latest(path, text):  # first run: die once the pretraining stage has its step-10 checkpoint
    real_latest(path, text)
    if mode == "mid-stage" and text.strip() == "step-000010":
        os.kill(os.getpid(), signal.SIGKILL)

def stages(path, text):  # second run: die right after the first stage is recorded as finished
    real_write(path, text)
    if mode == "after-stage":
        os.kill(os.getpid(), signal.SIGKILL)

ck.atomic_write_text, sr.atomic_write_text = latest, stages
sr.speedrun("cpu-smoke", out, dtype="fp32")
"""


def test_a_killed_speedrun_continues_its_training_stage_from_the_last_checkpoint(tmp_path):
    import subprocess
    import sys

    out, script = tmp_path / "sr", tmp_path / "killed.py"
    script.write_text(KILLED_SPEEDRUN)
    runs = [subprocess.run([sys.executable, str(script), mode, str(out)], capture_output=True, text=True)
            for mode in ("mid-stage", "after-stage")]
    assert [r.returncode for r in runs] == [-9, -9], runs[-1].stderr[-2000:]
    assert "resumed from" in runs[1].stdout and "at step 10" in runs[1].stdout, runs[1].stdout
    assert list(json.loads((out / "stages.json").read_text())) == ["pretrain recursive"]
    steps = [m["step"] for m in map(json.loads, (out / "recursive" / "metrics.jsonl").read_text().splitlines())
             if "loss" in m]
    assert steps == list(range(1, 31))  # each step once: the stage went on from step 10, not from 0


def test_speedrun_unknown_preset(tmp_path, capsys):
    assert main(["speedrun", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown speedrun preset" in capsys.readouterr().err


def test_probe_exit_row_gives_depth_ratios_and_points_lost(tmp_path):
    """The card's exit row: recursions on the easiest level and on the held-out ones, the hardest held-out level ÷
    the easiest level, and the points lost against 4r̄ over all levels and over the held-out ones."""
    from recurchat.speedrun.probes import ProbeNumbers, eval_file, exit_row

    levels = {"1": 1.0, "2": 1.0, "3": 0.9, "4": 0.8}  # under the exit; fixed 4r̄ = 24 scores 1.0 everywhere
    recursive = {"exit": {"latent:1e-05": {"acc": {}}},
                 "acc_by_difficulty": {"probe:parity:1-4": {"24": dict.fromkeys(levels, 1.0), "latent:1e-05": levels}},
                 "by_difficulty": {"probe:parity:1-4": {d: {"acc": a, "mean_recursions": r}
                                                        for (d, a), r in zip(levels.items(), (2, 3, 5, 8))}}}
    eval_file(tmp_path, "parity:1-2", "recursive").write_text(json.dumps(recursive))
    row = exit_row(ProbeNumbers(tmp_path, "parity:1-2", [("recursive", False)]))
    assert row == ("| parity:1-2 | `latent:1e-05` | 2.00 | 5.00 → 8.00 (1.60×) | 4.00× | 0.850 | +7.5 / +15.0 |")


def test_held_out_levels_double_the_trained_ones_and_keep_the_chase_budget():
    from recurchat.speedrun.probes import held_out
    assert held_out("parity:1-8") == "probe:parity:1-16"
    assert held_out("chase:1-4") == "probe:chase:1-8"  # the default budget of 8 names caps the longest chain
    assert held_out("chase:1-4:names=16") == "probe:chase:1-8:names=16"
    assert held_out("chase:1-12:names=16") == "probe:chase:1-16:names=16"


def test_chase_trains_by_a_curriculum_of_one_stage_per_hop_count_and_state_tracking_in_one_stage():
    from recurchat.errors import UserError
    from recurchat.speedrun.probes import curriculum
    from recurchat.speedrun.stages import SPEEDRUNS

    cpu = SPEEDRUNS["cpu"]
    assert [(s.name, n) for s, n in curriculum("chase:1-3:names=16", cpu)] == [
        ("probe:chase:1-1:names=16", 1200), ("probe:chase:1-2:names=16", 3000), ("probe:chase:1-3:names=16", 4000)]
    assert [(s.name, n) for s, n in curriculum("s3:1-8", cpu)] == [("probe:s3:1-8", 2000)]
    with pytest.raises(UserError, match="its 3 curriculum stages need as many chase_steps, got 2"):
        curriculum("chase:1-3", SPEEDRUNS["cpu-smoke"])
