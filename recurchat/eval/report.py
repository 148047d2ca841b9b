"""A sweep result (recurchat/eval/grid.py) as a markdown report with matplotlib plots, optionally beside a
standard model's result as the baseline.

    recurchat eval --ckpt DIR --tasks bpb,hops --recur 1,2,4,8 --exit kl:0.03 --report out/

Writes report.md plus acc_vs_r.png, bpb_vs_r.png, pareto.png, depth_vs_difficulty.png, acc_heatmap.png (accuracy
by difficulty × r) and trajectory.png (state change per iteration and the settling iteration, by difficulty), each
only when its data is present. Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing global
is switched and no display is needed. Every file is written atomically.
Exercised by `pytest tests/eval/test_eval_report.py`.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from recurchat.errors import UserError
from recurchat.eval.grid import exit_table, fixed_table
from recurchat.eval.result import EvalResult, depth_series, finite
from recurchat.files import atomic_write_bytes, atomic_write_text


def _figure(n_panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def save_png(fig, path: Path) -> None:
    """Lay out `fig` and write it as a PNG atomically (the sweep and the speedrun save their plots through it)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend only draws a warning
        ax.legend(fontsize=7)


def _setting_label(setting) -> str:
    return f"r={setting}" if str(setting).isdigit() else str(setting)


def _depth_ticks(ax, points) -> None:
    """Ticks at the measured depths only: r is an integer, and 1, 2, 4, 8 sweeps read badly on a 0.5 grid."""
    ticks = sorted({x for x, _ in points})
    if ticks:
        ax.set_xticks(ticks)


# ---- plots --------------------------------------------------------------------------------------------------
def _plot_acc_vs_r(result: EvalResult, baseline: EvalResult | None, path: Path) -> bool:
    series = {name: result.fixed_series(name) for name in result.accuracy_tasks()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, (ax,) = _figure()
    for i, (name, points) in enumerate(series.items()):
        color = f"C{i % 10}"
        ax.plot(*zip(*points), marker="o", color=color, label=name)
        base = baseline.standard_value(name) if baseline else None
        if base is not None:
            ax.axhline(base, color=color, linestyle="--", linewidth=1, label=f"{name} (standard)")
    centred = depth_series(result.centered_mean)
    if len(series) > 1 and centred:
        ax.plot(*zip(*centred), marker="s", color="black", linewidth=2, label="centered mean")
    _depth_ticks(ax, [p for points in series.values() for p in points])
    ax.set(xlabel="recursions r", ylabel="accuracy", title="accuracy vs r")
    ax.grid(alpha=0.3)
    legend(ax)
    save_png(fig, path)
    return True


def _plot_bpb_vs_r(result: EvalResult, baseline: EvalResult | None, path: Path) -> bool:
    points = result.fixed_series("bpb")
    if not points:
        return False
    fig, (ax,) = _figure()
    ax.plot(*zip(*points), marker="o", color="C0", label="fixed r")
    for i, (spec, entry) in enumerate(result.exit.items()):
        x, y = entry.mean_recursions, entry.bpb
        if x is not None and y is not None:
            ax.scatter([x], [y], marker="*", s=140, color=f"C{(i + 1) % 10}", zorder=3, label=f"exit {spec}")
    base = baseline.standard_value("bpb") if baseline else None
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", label="standard model")
    ax.set(xlabel="recursions per token", ylabel="bits per byte", title="held-out bpb vs r")
    ax.grid(alpha=0.3)
    legend(ax)
    save_png(fig, path)
    return True


def _plot_pareto(result: EvalResult, baseline: EvalResult | None, path: Path) -> bool:
    """One panel per task (and one for the centred mean): accuracy against recursions spent per token."""
    panels = []  # (title, fixed points, exit points [(spec, x, y)], baseline)
    for name in result.accuracy_tasks():
        exit_points = [(spec, x, y) for spec, entry in result.exit.items()
                       if (x := entry.recursions_for(name)) is not None
                       and (y := finite(entry.acc.get(name))) is not None]
        base = baseline.standard_value(name) if baseline else None
        panels.append((name, result.fixed_series(name), exit_points, base))
    if len(panels) > 1:
        exit_points = []
        for spec, entry in result.exit.items():
            by_task = [v for v in map(finite, entry.mean_recursions_by_task.values()) if v is not None]
            y = finite(result.centered_mean.get(spec))
            if by_task and y is not None:
                exit_points.append((spec, sum(by_task) / len(by_task), y))
        panels.append(("centered mean", depth_series(result.centered_mean), exit_points,
                       baseline.standard_centered() if baseline else None))
    panels = [p for p in panels if p[1] or p[2]]
    if not panels:
        return False
    fig, axes = _figure(len(panels))
    for ax, (title, fixed, exit_points, base) in zip(axes, panels):
        if fixed:
            ax.plot(*zip(*fixed), marker="o", color="C0", label="fixed r")
        for i, (spec, x, y) in enumerate(exit_points):
            ax.scatter([x], [y], marker="*", s=140, color=f"C{(i + 1) % 10}", zorder=3, label=f"exit {spec}")
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", label="standard model")
        ax.set(xlabel="mean recursions per token", ylabel="accuracy" if title != "centered mean" else "centred acc",
               title=title)
        ax.grid(alpha=0.3)
        legend(ax)
    save_png(fig, path)
    return True


def _plot_depth_vs_difficulty(result: EvalResult, baseline: EvalResult | None, path: Path) -> bool:
    series = {}
    for name, levels in result.by_difficulty.items():
        points = [(int(d), v.mean_recursions, v.acc) for d, v in levels.items() if str(d).lstrip("-").isdigit()]
        if points:
            series[name] = sorted(points)
    if not series:
        return False
    fig, (ax_r, ax_acc) = _figure(2)
    for i, (name, points) in enumerate(series.items()):
        color = f"C{i % 10}"
        depth = [(d, r) for d, r, _ in points if r is not None]
        acc = [(d, a) for d, _, a in points if a is not None]
        if depth:
            ax_r.plot(*zip(*depth), marker="o", color=color, label=name)
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", color=color, label=name)
        base_levels = baseline.by_difficulty.get(name, {}) if baseline else {}
        base = sorted((int(d), v.acc) for d, v in base_levels.items()
                      if str(d).lstrip("-").isdigit() and v.acc is not None)
        if base:
            ax_acc.plot(*zip(*base), linestyle="--", color=color, label=f"{name} (standard)")
    where = result.by_difficulty_at
    ax_r.set(xlabel="difficulty", ylabel="mean recursions per token",
             title=f"recursions used vs difficulty{f' ({_setting_label(where)})' if where else ''}")
    ax_acc.set(xlabel="difficulty", ylabel="accuracy", title="accuracy vs difficulty")
    for ax in (ax_r, ax_acc):
        ax.grid(alpha=0.3)
        legend(ax)
    save_png(fig, path)
    return True


def _heatmap_grid(levels_by_setting: dict) -> tuple[list[str], list[int], list[list[float]]] | None:
    """(fixed depths, difficulties, accuracy[difficulty][depth]) from acc_by_difficulty's fixed-r entries."""
    depths = sorted((k for k in levels_by_setting if str(k).isdigit()), key=int)
    levels = sorted({int(d) for k in depths for d in levels_by_setting[k]})
    if not depths or not levels:
        return None
    grid = [[finite(levels_by_setting[k].get(str(d))) for k in depths] for d in levels]
    return depths, levels, [[math.nan if v is None else v for v in row] for row in grid]


def plot_accuracy_heatmaps(result: EvalResult, path: Path, names: list[str] | None = None, title: str = "") -> bool:
    """One panel per probe (or task with levels): accuracy by difficulty (rows) × fixed r (columns)."""
    grids = {n: g for n, v in result.acc_by_difficulty.items()
             if (names is None or n in names) and (g := _heatmap_grid(v or {}))}
    if not grids:
        return False
    fig, axes = _figure(len(grids))
    for ax, (name, (depths, levels, grid)) in zip(axes, grids.items()):
        im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(depths)), [str(r) for r in depths])
        step = max(1, len(levels) // 8)
        ax.set_yticks(range(0, len(levels), step), [str(d) for d in levels[::step]])
        ax.set(xlabel="recursions r", ylabel="difficulty", title=f"{title}{name}")
        fig.colorbar(im, ax=ax, label="accuracy")
    save_png(fig, path)
    return True


def _plot_heatmaps(result: EvalResult, baseline: EvalResult | None, path: Path) -> bool:
    return plot_accuracy_heatmaps(result, path)


def _plot_trajectory(result: EvalResult, baseline: EvalResult | None, path: Path) -> bool:
    traj = {n: t for n, t in result.trajectory.items() if (t or {}).get("rel_change")}
    if not traj:
        return False
    fig, axes = _figure(2 * len(traj))
    for i, (name, t) in enumerate(traj.items()):
        ax_c, ax_s = axes[2 * i], axes[2 * i + 1]
        levels = sorted(t["rel_change"], key=int)
        for j, d in enumerate(levels):
            values = t["rel_change"][d]
            ax_c.semilogy(range(1, len(values) + 1), [max(v, 1e-7) for v in values],
                          color=f"C{j % 10}", label=f"difficulty {d}" if j % max(1, len(levels) // 6) == 0 else None)
        ax_c.set(xlabel="iteration i", ylabel="‖s_i − s_{i−1}‖ / ‖s_i‖", title=f"{name}: state change")
        ax_s.plot([int(d) for d in levels], [t["settle"][d] for d in levels], marker="o")
        ax_s.set(xlabel="difficulty", ylabel="iteration", title=f"{name}: answer settles at")
        for ax in (ax_c, ax_s):
            ax.grid(alpha=0.3)
        legend(ax_c)
    save_png(fig, path)
    return True


PLOTS = (("acc_vs_r.png", "Accuracy vs recursions", _plot_acc_vs_r),
         ("bpb_vs_r.png", "Held-out bits per byte vs recursions", _plot_bpb_vs_r),
         ("pareto.png", "Accuracy vs compute (fixed r and exit criteria)", _plot_pareto),
         ("depth_vs_difficulty.png", "Recursions used vs difficulty", _plot_depth_vs_difficulty),
         ("acc_heatmap.png", "Accuracy by difficulty × recursions", _plot_heatmaps),
         ("trajectory.png", "State trajectory by difficulty", _plot_trajectory))


# ---- markdown -----------------------------------------------------------------------------------------------
def _markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] + ["---:"] * (len(header) - 1)), *(line(r) for r in rows)])


def _difficulty_table(result: EvalResult) -> str | None:
    rows = []
    for name, levels in result.by_difficulty.items():
        for d, v in levels.items():
            acc, r = v.acc, v.mean_recursions
            rows.append([name, str(d), "-" if acc is None else f"{acc:.3f}", "-" if r is None else f"{r:.2f}"])
    return _markdown(["task", "difficulty", "acc", "mean r"], rows) if rows else None


def _sections(result: EvalResult, heading: str) -> list[str]:
    parts = []
    header, rows = fixed_table(result)
    if rows:
        parts += [f"### {heading}: fixed recursion depth", "", _markdown(header, rows), ""]
    header, rows = exit_table(result)
    if rows:
        parts += [f"### {heading}: exit criteria", "", _markdown(header, rows), ""]
    table = _difficulty_table(result)
    if table:
        at = result.by_difficulty_at
        parts += [f"### {heading}: by difficulty{f' (at {_setting_label(at)})' if at else ''}", "", table, ""]
    return parts


def write_report(result: EvalResult, out_dir: str | Path, title: str = "recurchat eval",
                 baseline: EvalResult | None = None) -> Path:
    """Write report.md and the plots into `out_dir`; returns the path of report.md. `baseline` (a standard
    model's sweep result) is drawn as dashed lines and tabulated after the main result."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if result.params is not None:
        lines += [f"Parameters: {result.params:,}", ""]
    if result.settings.get("n_examples"):
        counts = ", ".join(f"{k} {v}" for k, v in result.settings["n_examples"].items())
        lines += [f"Examples per task: {counts}", ""]
    lines += [f"> note: {n}" for n in result.notes]
    if result.notes:
        lines.append("")
    lines += _sections(result, "Results")
    if baseline:
        lines += _sections(baseline, "Standard model (baseline)")
    for filename, caption, plot in PLOTS:
        if plot(result, baseline, out / filename):
            lines += [f"## {caption}", "", f"![{caption}]({filename})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
