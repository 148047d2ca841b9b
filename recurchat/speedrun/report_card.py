"""The speedrun's report card: a headline table of the three models, sentences generated from its numbers, then
the loss curves, wall times, machine and the full evaluation. Nothing in it is written by hand.

    recurchat speedrun --preset cpu-smoke --out runs/speedrun-smoke     # writes runs/speedrun-smoke/report.md

Inputs (all written by the speedrun's stages): NAME/metrics.jsonl (pretraining), eval-base-NAME.json (the base's
held-out bpb over r) and eval-NAME.json (the SFT model: plain-text bpb and chain accuracy by difficulty over r and
exit criteria) for NAME in recursive, standard (the iso-FLOP twin) and iso-params.
Exercised by `pytest tests/test_speedrun.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import torch

from recurchat.config import ModelConfig, get_preset
from recurchat.eval.report import legend, save_png
from recurchat.eval.result import EvalResult
from recurchat.files import atomic_write_text
from recurchat.model.flops import flops_per_token
from recurchat.speedrun.probes import card_section
from recurchat.train.telemetry import read_records

LABELS = {"recursive": "recursive", "standard": "iso-FLOP twin", "iso-params": "iso-params"}
PROBE = "chain"
TWO_CONSTANT_GUESS = 0.5  # a chain prompt holds two constants: the asked chain's and the distractor's


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


def median_tok_s(run: Path) -> float:
    return statistics.median(m["tok_s"] for m in read_records(run / "metrics.jsonl") if "tok_s" in m)


def level_mean(by_level: dict[str, float], levels: range) -> float | None:
    """Mean accuracy over `levels` (each level has the same number of examples, give or take one)."""
    values = [by_level[str(d)] for d in levels if str(d) in by_level]
    return sum(values) / len(values) if values else None


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


class Numbers:
    """Everything the headline reads, for one model: from its pretraining log and its two evaluation files."""

    def __init__(self, out: Path, name: str, cfg: ModelConfig, probe_levels: int):
        self.name, self.cfg = name, cfg
        self.base = EvalResult.from_json(json.loads((out / f"eval-base-{name}.json").read_text()))
        self.sft = EvalResult.from_json(json.loads((out / f"eval-{name}.json").read_text()))
        self.tok_s = median_tok_s(out / name)
        self.trained, self.held_out = range(1, probe_levels + 1), range(probe_levels + 1, 2 * probe_levels + 1)
        probe = next(k for k in self.sft.acc_by_difficulty if k.startswith(PROBE))
        self.by_level = self.sft.acc_by_difficulty[probe]  # {r or criterion: {level: acc}}
        self.by_difficulty = self.sft.by_difficulty[probe]  # {level: Level(acc, mean_recursions)} at the first exit

    @property
    def r_bar(self) -> str:
        return str(self.cfg.mean_recur) if self.cfg.recursive else "1"

    def base_bpb(self, r: int) -> float | None:
        return self.base.tasks["bpb"].get(str(r if self.cfg.recursive else 1))

    def sft_bpb_ratio(self) -> float:
        return self.sft.tasks["bpb"][self.r_bar] / self.base.tasks["bpb"][self.r_bar]

    def probe_acc(self, setting: str, levels: range) -> float | None:
        return level_mean(self.by_level.get(setting, {}), levels)


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def headline_table(models: list[Numbers], r_bar: int) -> list[str]:
    deep = 4 * r_bar
    rows = [
        f"| model | params | inference FLOPs/token | train tok/s | base bpb r=1 | r̄={r_bar} | 4r̄={deep} | "
        f"SFT plain-text bpb ÷ base | {PROBE} 1..D at r̄ | held-out D+1..2D at r̄ | at 4r̄ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        recursive = m.cfg.recursive
        rows.append(
            f"| {LABELS[m.name]} | {m.sft.params:,} | {flops_per_token(m.cfg, backward=False):.3g} | "
            f"{m.tok_s:,.0f} | {fmt(m.base_bpb(1), '.4f')} | {fmt(m.base_bpb(r_bar) if recursive else None, '.4f')} | "
            f"{fmt(m.base_bpb(deep) if recursive else None, '.4f')} | {m.sft_bpb_ratio():.3f}× | "
            f"{fmt(m.probe_acc(m.r_bar, m.trained))} | {fmt(m.probe_acc(m.r_bar, m.held_out))} | "
            f"{fmt(m.probe_acc(str(deep), m.held_out) if recursive else None)} |")
    return rows


def exit_table(rec: Numbers, criterion: str) -> tuple[list[str], float]:
    """Recursions per token and accuracy by difficulty under `criterion`, and the slope of recursions on level."""
    levels = sorted(int(d) for d in rec.by_difficulty)
    rows = [f"| {PROBE} difficulty | " + " | ".join(map(str, levels)) + " |", "|---|" + "---:|" * len(levels),
            "| mean recursions | " + " | ".join(f"{rec.by_difficulty[str(d)].mean_recursions:.2f}"
                                             for d in levels) + " |",
            "| accuracy | " + " | ".join(f"{rec.by_difficulty[str(d)].acc:.3f}" for d in levels) + " |"]
    fit = slope([float(d) for d in levels], [rec.by_difficulty[str(d)].mean_recursions for d in levels])
    return rows, fit


def flops_ratio(a: Numbers, b: Numbers) -> float:
    return 100 * flops_per_token(a.cfg, backward=False) / flops_per_token(b.cfg, backward=False)


def percent(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def sentences(rec: Numbers, iso_flop: Numbers, iso_params: Numbers, criterion: str, fit: float) -> list[str]:
    """Two to four sentences, each computed from the numbers in the tables above it."""
    r, deep = rec.cfg.mean_recur, 4 * rec.cfg.mean_recur
    out = [f"At r̄ = {r} the recursive base model's held-out bpb ({rec.base_bpb(r):.4f}) is "
           f"{percent(rec.base_bpb(r), iso_flop.base_bpb(1))} against the iso-FLOP twin ({iso_flop.base_bpb(1):.4f}) "
           f"with {100 * rec.sft.params / iso_flop.sft.params:.0f}% of its parameters, and "
           f"{percent(rec.base_bpb(r), iso_params.base_bpb(1))} against the iso-params model "
           f"({iso_params.base_bpb(1):.4f}), which runs {flops_ratio(iso_params, rec):.0f}% of its FLOPs per token "
           "(negative = lower bpb, better)."]
    at_r, at_deep = rec.probe_acc(str(r), rec.held_out), rec.probe_acc(str(deep), rec.held_out)
    if at_r is not None and at_deep is not None:
        twins = ", ".join(f"{LABELS[m.name]} {fmt(m.probe_acc('1', m.held_out))}" for m in (iso_flop, iso_params))
        out.append(f"Going from r̄ = {r} to 4r̄ = {deep} recursions changes accuracy on the held-out harder chains "
                   f"(difficulties {rec.held_out.start}..{rec.held_out.stop - 1}, never trained on) by "
                   f"{100 * (at_deep - at_r):+.1f} points ({at_r:.3f} → {at_deep:.3f}); the standard models, which "
                   f"cannot run deeper, score {twins}. On the trained difficulties the recursive model scores "
                   f"{fmt(rec.probe_acc(str(r), rec.trained))} at r̄.")
    guesses = [a for m in (rec, iso_flop, iso_params) if (a := m.probe_acc(m.r_bar, m.trained)) is not None]
    if guesses and max(abs(a - TWO_CONSTANT_GUESS) for a in guesses) <= 0.1:
        out.append(f"None of the three models follows the pointers yet: every accuracy on the trained difficulties is "
                   f"within 0.1 of {TWO_CONSTANT_GUESS}, what picking one of the prompt's two constants scores.")
    out.append(f"Under the exit criterion {criterion} the recursive model spends {fit:+.4f} recursions per token "
               "per extra hop of difficulty (least-squares slope over the levels below).")
    out.append(f"After SFT its plain-text bpb is {rec.sft_bpb_ratio():.3f}× its base's at r̄ (iso-FLOP twin "
               f"{iso_flop.sft_bpb_ratio():.3f}×, iso-params {iso_params.sft_bpb_ratio():.3f}×).")
    return out


def models_table(models: list[Numbers], bptt_k: int) -> list[str]:
    rows = ["| model | blocks (P/R/C) | params | train FLOPs/token at r̄ | inference FLOPs/token at r̄ |",
            "|---|---|---|---|---|"]
    for m in models:
        c = m.cfg
        depth = f", r̄={c.mean_recur}" if c.recursive else ""
        rows.append(f"| {LABELS[m.name]} | {c.n_prelude}/{c.n_shared}/{c.n_coda}{depth} | {m.sft.params:,} | "
                    f"{flops_per_token(c, c.mean_recur, bptt_k):.3g} | {flops_per_token(c, backward=False):.3g} |")
    return rows


def machine_section(out: Path, names: list[str]) -> list[str]:
    return [
        "## Machine", "",
        f"{platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}; "
        f"{os.cpu_count()} CPUs" + (f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), "",
        "MFU is against the peak FLOP/s of the model's own matmuls, measured on this machine in the run's dtype "
        "(or given by --peak-flops), as each run recorded it:", "",
        "| run | device | dtype (why) | threads | peak | median step |", "|---|---|---|---|---|---|",
        *[training_speed(out / run) for name in names for run in (name, f"{name}-sft")], ""]


def report_card(out: Path, preset_name: str, sp, runs: tuple[tuple[str, str], ...]) -> Path:
    """DIR/report.md: headline, sentences, models, loss curves, wall times, machine, then the full evaluation of the
    recursive SFT model with the iso-FLOP twin as its baseline (DIR/eval/). `runs`: (directory, the standard
    baseline it is, or "" for the recursive model), recursive first, then iso-FLOP, then iso-params."""
    from recurchat.eval.report import write_report

    cfg, names = get_preset(sp.model_preset).model, [name for name, _ in runs]
    models = [Numbers(out, name, cfg.twin(kind) if kind else cfg, sp.probe_levels) for name, kind in runs]
    rec, iso_flop, iso_params = models
    criterion = rec.sft.by_difficulty_at
    write_report(rec.sft, out / "eval", title="recursive model (iso-FLOP twin as baseline)", baseline=iso_flop.sft)
    loss_curves({LABELS[m.name]: (out / m.name, m.r_bar) for m in models}, out / "loss_curves.png")
    exits, fit = exit_table(rec, criterion)
    stages = json.loads((out / "stages.json").read_text())
    lines = [
        f"# recurchat speedrun: {preset_name}", "",
        f"`recurchat speedrun --preset {preset_name} --out {out}`", "",
        *card_section(out, sp, runs),
        "## Language model and pointer chasing in chat (SFT)", "",
        *headline_table(models, rec.cfg.mean_recur), "",
        *sentences(rec, iso_flop, iso_params, criterion, fit), "",
        f"Recursive model under exit `{criterion}`, by {PROBE} difficulty (1..{sp.probe_levels} trained, "
        f"{sp.probe_levels + 1}..{2 * sp.probe_levels} held out):", "", *exits, "",
        "## Models", "", *models_table(models, get_preset(sp.model_preset).train.bptt_k), "",
        f"All three pretrained for {sp.pretrain_steps} steps on the same tokens, then SFT for {sp.sft_steps} steps "
        f"on `{sp.sft_data}` (pointer chasing, difficulties 1..{sp.probe_levels}; the recursive model with its "
        "recursion sampler). Base bpb: the pretrained model on held-out text; SFT plain-text bpb: the SFT model on "
        "the same text, at r̄.", "",
        "## Loss curves", "", "![loss curves](loss_curves.png)", "",
        "## Wall time per stage", "", "| stage | seconds |", "|---|---|",
        *[f"| {name} | {sec:.0f} |" for name, sec in stages.items()],
        f"| total | {sum(stages.values()):.0f} |", "",
        *machine_section(out, names),
        "## Evaluation of the recursive SFT model", "",
    ]
    evaluation = (out / "eval" / "report.md").read_text().split("\n")
    evaluation = [line.replace("](", "](eval/") if line.startswith("![") else line for line in evaluation[1:]]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines + evaluation))
    return path
