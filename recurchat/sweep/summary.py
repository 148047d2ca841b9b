"""A sweep's results: DIR/summary.json, DIR/summary.md and two plots, rewritten after every trial.

summary.json: {"spec": the sweep, "trials": [{number, model, params, run_dir, state, n_params, mean_recur,
bpb: {r: bits per byte}, depth_gain, phi, baselines: {iso-params|iso-flops: bpb}}], "regimes": [...]}.
    depth_gain = bpb(r=1) / bpb(r̄) − 1                    (how much the iterations buy; > 0 is good)
    phi        = (bpb_iso-params − bpb(r̄)) / (bpb_iso-params − bpb_iso-flops)
                 how much of what depth buys the recursive model captures with the iso-params weight count:
                 1 = as good as the iso-FLOP twin, 0 = no better than the iso-params model (only defined where
                 the iso-FLOP twin beats the iso-params model, i.e. where depth pays at all).
A recursive trial is compared with the best baseline trials of its regime (the grid values they share).
Plots: bpb_vs_r.png (bpb against r per recursive trial, baselines as horizontal lines, one panel per regime) and
phi.png (φ per trial). Exercised by `pytest tests/test_sweep.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from recurchat.config import TWINS
from recurchat.eval.report import legend, save_png
from recurchat.files import atomic_write_json, atomic_write_text
from recurchat.sweep.space import RECURSIVE, SweepSpec, regime_of


def trial_record(t: optuna.trial.FrozenTrial, spec: SweepSpec) -> dict:
    chosen = t.params or t.system_attrs.get("fixed_params", {})  # a waiting trial has only its planned values
    params = {k: v for k, v in chosen.items() if k != "model"}
    return {"number": t.number, "model": chosen.get("model"), "params": params, "regime": regime_of(params, spec),
            "run_dir": t.user_attrs.get("run_dir"), "state": t.state.name, "n_params": t.user_attrs.get("n_params"),
            "mean_recur": t.user_attrs.get("mean_recur"), "bpb": t.user_attrs.get("bpb", {}),
            "acc": t.user_attrs.get("acc", {}), "acc_long": t.user_attrs.get("acc_long", {}),
            "error": t.user_attrs.get("error")}


def best_baselines(records: list[dict], regime: dict) -> dict[str, float]:
    """The lowest bpb of each baseline kind among finished trials of `regime`."""
    best: dict[str, float] = {}
    for r in records:
        if r["model"] in TWINS and r["regime"] == regime and r["bpb"]:
            best[r["model"]] = min(best.get(r["model"], math.inf), r["bpb"]["1"])
    return best


def depth_figures(record: dict, baselines: dict[str, float]) -> dict:
    bpb, rbar = record["bpb"], str(record["mean_recur"])
    gain = bpb["1"] / bpb[rbar] - 1 if "1" in bpb and rbar in bpb else None
    phi = None
    if len(baselines) == 2 and rbar in bpb and baselines["iso-params"] > baselines["iso-flops"]:
        phi = (baselines["iso-params"] - bpb[rbar]) / (baselines["iso-params"] - baselines["iso-flops"])
    return {"depth_gain": gain, "phi": phi, "baselines": baselines}


def collect(study: optuna.Study, spec: SweepSpec) -> dict:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.PRUNED]
    records = [trial_record(t, spec) for t in trials]
    # a retried trial's record replaces the killed original's (they share a run directory)
    finished = {r["run_dir"]: r for r in records if r["state"] == "COMPLETE"}
    records = [r for r in records if r["state"] != "FAIL" or r["error"] or r["run_dir"] not in finished]
    for r in records:
        if r["model"] == RECURSIVE and r["bpb"]:
            r.update(depth_figures(r, best_baselines(records, r["regime"])))
    regimes = []
    for r in records:
        if r["regime"] not in regimes:
            regimes.append(r["regime"])
    return {"spec": json.loads(spec.to_json()), "trials": records, "regimes": regimes}


def _fmt(x, pattern: str = "{:.4f}") -> str:
    return "–" if x is None else pattern.format(x)


def probe_markdown(summary: dict) -> str:
    """A probe sweep: accuracy on the trained levels and on the held-out longer ones, at each evaluated r."""
    spec = summary["spec"]
    depths = sorted({int(r) for t in summary["trials"] for r in t["acc"]})
    data = spec["data"] or "the preset's own"
    lines = [f"# Sweep: preset {spec['preset']}, {spec['max_steps']} steps, data `{data}`", "",
             f"grid `{spec['grid'] or '–'}` · search `{spec['search'] or '–'}` · baselines "
             f"{', '.join(spec['standard']) or '–'}", "",
             "Label accuracy on the trained levels / on the held-out levels up to twice as hard, at each r.", "",
             "| trial | model | params | " + " | ".join(f"r={r}" for r in depths) + " | state |",
             "|" + "---|" * (4 + len(depths))]
    for t in summary["trials"]:
        shown = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "–"
        cells = [f"{_fmt(t['acc'].get(str(r)), '{:.3f}')} / {_fmt(t['acc_long'].get(str(r)), '{:.3f}')}"
                 for r in depths]
        lines.append(f"| {t['number']} | {t['model']} | {shown} | " + " | ".join(cells) + f" | {t['state'].lower()}"
                     + (f": {t['error']}" if t["error"] else "") + " |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict) -> str:
    spec = summary["spec"]
    if any(t["acc"] for t in summary["trials"]):
        return probe_markdown(summary)
    depths = sorted({int(r) for t in summary["trials"] for r in t["bpb"]})
    lines = [f"# Sweep: preset {spec['preset']}, {spec['max_steps']} steps", "",
             f"grid `{spec['grid'] or '–'}` · search `{spec['search'] or '–'}` · baselines "
             f"{', '.join(spec['standard']) or '–'}", "",
             "val bpb at each r (lower is better); depth gain = bpb(1)/bpb(r̄) − 1; "
             "φ = (iso-params − recursive at r̄) / (iso-params − iso-FLOP).", "",
             "| trial | model | params | n params | " + " | ".join(f"r={r}" for r in depths)
             + " | depth gain | φ | state |",
             "|" + "---|" * (7 + len(depths))]
    for t in summary["trials"]:
        shown = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "–"
        cells = [_fmt(t["bpb"].get(str(r))) for r in depths]
        lines.append(f"| {t['number']} | {t['model']} | {shown} | {_fmt(t['n_params'], '{:,}')} | "
                     + " | ".join(cells) + f" | {_fmt(t.get('depth_gain'), '{:+.2%}')} | "
                     f"{_fmt(t.get('phi'), '{:.2f}')} | {t['state'].lower()}"
                     + (f": {t['error']}" if t["error"] else "") + " |")
    return "\n".join(lines) + "\n"


def plots(summary: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    regimes = summary["regimes"] or [{}]
    fig = Figure(figsize=(6.5, 4 * len(regimes)))
    FigureCanvasAgg(fig)
    for i, regime in enumerate(regimes):
        ax = fig.add_subplot(len(regimes), 1, i + 1)
        rows = [t for t in summary["trials"] if t["regime"] == regime and t["bpb"]]
        for t in rows:
            label = f"#{t['number']} " + (", ".join(f"{k}={v}" for k, v in t["params"].items() if k not in regime)
                                          or t["model"])
            if t["model"] == RECURSIVE:
                rs = sorted(t["bpb"], key=int)
                ax.plot([int(r) for r in rs], [t["bpb"][r] for r in rs], marker="o", label=label)
            else:
                ax.axhline(t["bpb"]["1"], linestyle="--", color="black" if t["model"] == "iso-params" else "gray",
                           label=f"#{t['number']} {t['model']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("r (recursions at evaluation)")
        ax.set_ylabel("val bpb")
        ax.set_title(", ".join(f"{k}={v}" for k, v in regime.items()) or "all trials", fontsize=9)
        legend(ax)
    save_png(fig, out / "bpb_vs_r.png")
    fig = Figure(figsize=(6.5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scored = [t for t in summary["trials"] if t.get("phi") is not None]
    ax.bar([f"#{t['number']}" for t in scored], [t["phi"] for t in scored])
    ax.axhline(0.5, linestyle="--", color="gray")
    ax.set_ylabel("φ (depth efficiency)")
    ax.set_xlabel("recursive trial")
    save_png(fig, out / "phi.png")


def write_summary(study_dir: Path, study: optuna.Study, spec: SweepSpec) -> dict:
    summary = collect(study, spec)
    atomic_write_json(study_dir / "summary.json", summary)
    atomic_write_text(study_dir / "summary.md", markdown(summary))
    plots(summary, study_dir)
    return summary
