"""One command from nothing to a report card: the recursive model against its iso-FLOP standard twin.

    recurchat speedrun --preset cpu-smoke --out runs/speedrun-smoke     # tiny, about a minute (runs in CI)
    recurchat speedrun --preset cpu --out runs/speedrun                 # cpu-tiny models, the CPU report card

Stages: pretrain the recursive model → pretrain the standard twin (P + r̄·R + C blocks, same width, same tokens and
schedule) → SFT both on the built-in tasks → evaluate both (bpb and tasks over r, adaptive exit, by difficulty) →
DIR/report.md. Every stage calls the library function behind the command a user would type (`train` with a RunSpec,
`evaluate_checkpoint`). A finished stage is recorded in DIR/stages.json and skipped on the next run; an interrupted
training stage resumes from its checkpoint.
Exercised by `pytest tests/test_speedrun.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from recurchat.config import get_preset
from recurchat.errors import UserError
from recurchat.eval.command import EvalRequest, evaluate_checkpoint
from recurchat.eval.report import legend, save_png
from recurchat.files import atomic_write_text
from recurchat.model.flops import flops_per_token
from recurchat.model.hardware import set_threads
from recurchat.train.spec import pretrain_spec, sft_spec
from recurchat.train.telemetry import read_records
from recurchat.train.trainer import train_or_resume


@dataclass(frozen=True)
class SpeedrunPreset:
    model_preset: str
    pretrain_steps: int
    sft_steps: int
    sft_examples: int
    sft_batch_size: int
    limit: int
    eval_tokens: int
    depths: str = "1,2,4,8,16"
    exits: str = "kl:3e-2,kl:1e-1"
    tasks: str = "bpb,hops,arith"
    sft_data: str = "builtin:hops,arith"


SPEEDRUNS = {
    "cpu-smoke": SpeedrunPreset("cpu-smoke", pretrain_steps=30, sft_steps=20, sft_examples=200, sft_batch_size=8,
                                limit=8, eval_tokens=2048),
    "cpu": SpeedrunPreset("cpu-tiny", pretrain_steps=400, sft_steps=300, sft_examples=5000, sft_batch_size=32,
                          limit=48, eval_tokens=8192),
    "gpu-d20": SpeedrunPreset("gpu-d20", pretrain_steps=20000, sft_steps=1000, sft_examples=20000, sft_batch_size=32,
                              limit=500, eval_tokens=10 * 524288),
}


def run_stage(out: Path, name: str, fn) -> None:
    """Run `fn` unless stages.json says `name` finished; record its wall time."""
    path = out / "stages.json"
    stages = json.loads(path.read_text()) if path.exists() else {}
    if name in stages:
        print(f"[speedrun] {name}: done earlier ({stages[name]:.0f} s), skipping", flush=True)
        return
    print(f"[speedrun] {name} ...", flush=True)
    t0 = time.perf_counter()
    fn()
    stages[name] = time.perf_counter() - t0
    atomic_write_text(path, json.dumps(stages, indent=2))


def loss_curves(runs: dict[str, tuple[Path, str]], path: Path) -> None:
    """Train loss (nats/token, left) and val bpb at the given r (bits/byte, right) of each run: two units, two axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, bpb_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, (run, r) in runs.items():
        rows = read_records(run / "metrics.jsonl")
        train = [m for m in rows if "loss" in m]
        loss_ax.plot([m["step"] for m in train], [m["loss"] for m in train], label=label, alpha=0.7)
        evals = [m for m in rows if r in m.get("val_bpb", {})]
        bpb_ax.plot([m["step"] for m in evals], [m["val_bpb"][r] for m in evals], "o--", label=f"{label} (r={r})")
    for ax, unit in ((loss_ax, "train loss (nats/token)"), (bpb_ax, "val bpb (bits/byte)")):
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.set_title(f"pretraining: {unit}")
        ax.grid(alpha=0.3)
        legend(ax)
    save_png(fig, path)


def training_speed(run: Path) -> str:
    """One table row: the run's machine facts (its first `run` record) and median s/step and MFU."""
    rows = read_records(run / "metrics.jsonl")
    machine = next((m["run"] for m in rows if "run" in m), None)
    steps = [m for m in rows if "dt" in m]
    if machine is None or not steps:
        return f"| {run.name} | (no timing recorded) | | | | |"
    dt = statistics.median(m["dt"] for m in steps)
    mfu = statistics.median(m["mfu"] for m in steps)
    return (f"| {run.name} | {machine['device']} | {machine['dtype']} ({machine['dtype_reason']}) | "
            f"{machine['threads']} | {machine['peak_flops'] / 1e9:,.0f} GFLOP/s ({machine['peak_flops_source']}) | "
            f"{dt:.2f} s, MFU {100 * mfu:.1f}% |")


def report_card(out: Path, preset_name: str, sp: SpeedrunPreset) -> Path:
    from recurchat.eval.report import write_report

    rec = json.loads((out / "eval-recursive.json").read_text())
    std = json.loads((out / "eval-standard.json").read_text())
    write_report(rec, out / "eval", title="recursive model (standard twin as baseline)", baseline=std)
    p = get_preset(sp.model_preset)
    loss_curves({"recursive": (out / "recursive", str(p.model.mean_recur)), "standard": (out / "standard", "1")},
                out / "loss_curves.png")
    cfg, twin, k = p.model, p.model.standard_twin(), p.train.bptt_k
    stages = json.loads((out / "stages.json").read_text())
    lines = [
        f"# recurchat speedrun: {preset_name}", "",
        f"`recurchat speedrun --preset {preset_name} --out {out}`", "",
        "## Models", "",
        "| model | blocks (P/R/C) | params | train FLOPs/token at r̄ | inference FLOPs/token at r̄ |",
        "|---|---|---|---|---|",
        f"| recursive | {cfg.n_prelude}/{cfg.n_shared}/{cfg.n_coda}, r̄={cfg.mean_recur} | {rec['params']:,} | "
        f"{flops_per_token(cfg, cfg.mean_recur, k):.3g} | {flops_per_token(cfg, backward=False):.3g} |",
        f"| standard twin | {twin.n_prelude}/0/{twin.n_coda} | {std['params']:,} | {flops_per_token(twin):.3g} | "
        f"{flops_per_token(twin, backward=False):.3g} |", "",
        f"Both pretrained for {sp.pretrain_steps} steps on the same tokens, then SFT for {sp.sft_steps} steps on "
        f"`{sp.sft_data}`.", "",
        "## Loss curves", "", "![loss curves](loss_curves.png)", "",
        "## Wall time per stage", "", "| stage | seconds |", "|---|---|",
        *[f"| {name} | {sec:.0f} |" for name, sec in stages.items()], "",
        "## Machine", "",
        f"{platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}; "
        f"{os.cpu_count()} CPUs" + (f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), "",
        "MFU is against the peak FLOP/s of the model's own matmuls, measured on this machine in the run's dtype "
        "(or given by --peak-flops), as each run recorded it:", "",
        "| run | device | dtype (why) | threads | peak | median step |", "|---|---|---|---|---|---|",
        *[training_speed(out / name) for name in ("recursive", "standard", "recursive-sft", "standard-sft")], "",
        "## Evaluation", "",
    ]
    evaluation = (out / "eval" / "report.md").read_text().split("\n")
    evaluation = [line.replace("](", "](eval/") if line.startswith("![") else line for line in evaluation[1:]]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines + evaluation))
    return path


def speedrun(preset_name: str, out: str | Path, data: str | None = None, dtype: str = "auto",
             threads: int = 0) -> Path:
    """Every stage, then the report card; `dtype` goes to every stage, `threads` (0 = torch's default) to torch."""
    set_threads(threads)
    if preset_name not in SPEEDRUNS:
        raise UserError(f"unknown speedrun preset {preset_name!r} (choose from {', '.join(SPEEDRUNS)})")
    sp = SPEEDRUNS[preset_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a checkpoint every ~10% of a stage, so an interrupted stage loses at most that much
    pretrain = {"max_steps": sp.pretrain_steps, "save_every": max(10, sp.pretrain_steps // 10), "dtype": dtype,
                **({"data": data} if data else {})}
    for name, standard in (("recursive", ""), ("standard", "iso-flops")):
        run = out / name
        run_stage(out, f"pretrain {name}", lambda run=run, standard=standard: train_or_resume(
            run, lambda: pretrain_spec(sp.model_preset, run, standard=standard, train=pretrain, overwrite=True)))
    sft = {"data": sp.sft_data, "max_steps": sp.sft_steps, "save_every": max(10, sp.sft_steps // 10),
           "batch_size": sp.sft_batch_size, "dtype": dtype,
           "total_batch_tokens": get_preset(sp.model_preset).model.seq_len * sp.sft_batch_size,
           "sft_examples": sp.sft_examples}
    for name in ("recursive", "standard"):
        run = out / f"{name}-sft"
        run_stage(out, f"sft {name}", lambda run=run, base=out / name: train_or_resume(
            run, lambda: sft_spec(base, run, train=sft, overwrite=True)))
    for name in ("recursive", "standard"):
        request = EvalRequest(ckpt=str(out / f"{name}-sft"), tasks=sp.tasks, recur=sp.depths, exit=sp.exits,
                              limit=sp.limit, eval_tokens=sp.eval_tokens, quiet=True,
                              json=str(out / f"eval-{name}.json"), dtype=dtype, data=data)
        run_stage(out, f"eval {name}", lambda request=request: evaluate_checkpoint(request))
    path = report_card(out, preset_name, sp)
    print(f"[speedrun] report card: {path}", flush=True)
    return path

