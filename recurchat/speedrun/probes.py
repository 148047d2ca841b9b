"""The speedrun's depth probes: each probe trained from scratch on the recursive model and both standard baselines,
the recursive model's exit calibrated on it, all three evaluated on levels up to twice the trained ones.

    recurchat speedrun --preset cpu --out runs/speedrun     # probes/<probe>-<model>/ and eval-probe-*.json

A probe `parity:1-8` trains on difficulties 1..8 (`recurchat train --preset probe --data probe:parity:1-8`) and is
evaluated on 1..16 (`recurchat eval --tasks probe:parity:1-16`) at r ∈ {1, 2, r̄, 2r̄, 4r̄} and under the exit
calibrated on it (`recurchat calibrate --probe … --criterion latent --max-acc-loss 0.01`, against fixed 4r̄; where
no latent threshold holds, `recurchat exit-train --probe … --label answer` and `--criterion gate`).
The card's first screen (`card_section`) is built from those files: accuracy heat maps (difficulty × r), the
extrapolation numbers and the recursions the calibrated exit spends per difficulty. Pointer chasing (`chase:1-3`) is
learned only by a curriculum (`curriculum`): chains of 1, then 1-2, then 1-3, each stage `recurchat train
--init-from` the last, the recursive model's later stages with `--hint-weight` (HINT_WEIGHTS).
Exercised by `pytest tests/test_speedrun.py`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from recurchat import checkpoint
from recurchat.config import get_preset
from recurchat.data.tasks.probes import ProbeSpec, parse_probe
from recurchat.eval.calibrate import calibrate_probe_checkpoint
from recurchat.eval.evaluate import EvalRequest, evaluate_checkpoint
from recurchat.errors import UserError
from recurchat.eval.report import plot_accuracy_heatmaps
from recurchat.eval.result import EvalResult
from recurchat.train.exit_gate import train_exit_gate
from recurchat.train.spec import init_spec, pretrain_spec
from recurchat.train.trainer import train_or_resume

PRESET = "probe"
# Pointer chasing must look anywhere in the context (a statement can be 50 positions from its query): full attention,
# and every attention layer inside the loop (P/R/C = 0/1/0), so each hop waits for its iterations; 2.5× the preset's
# rates, set in its first stage (direct look-ups, which leave the plateau only so) and kept by the later ones
# (docs/ablations/probes/ §6).
MODEL_OVERRIDES = {"chase": {"attn_window": 0, "n_prelude": 0, "n_coda": 0}}
RATES = {"chase": {"lr_matrix": 0.05, "lr_embed": 0.12, "lr_head": 0.01}}
# Hints from the second stage on, for the recursive model (a standard model has no iterations to read out): each
# iteration's readout trained on the name its query's chain has reached (`--hint-weight`, train/recipes.py); the
# trained hops come faster than without (docs/ablations/probes/ §6, "Hints").
HINT_WEIGHTS = {"chase": 1.0}
# the exit calibrated on each probe: the first criterion that keeps the accuracy loss against fixed 4r̄ within
# MAX_ACC_LOSS; the gate is trained on the probe's labels first (`recurchat exit-train --probe … --label answer`)
CRITERIA = ("latent", "gate")
MAX_ACC_LOSS = 0.01
EVAL_DTYPE = "fp32"  # probe calibration and evaluation: exact answers, tiny models, and bf16 would blur the latent exit
LABELS = {"recursive": "recursive", "standard": "iso-FLOP twin", "iso-params": "iso-params"}
# "held-out rises with r" allows a drop this small between two depths: at chance, the held-out labels of
# probe_limit = 256 sequences give their mean accuracy a standard error of about 0.01-0.02
RISE_TOLERANCE = 0.02


def held_out(probe: str) -> str:
    """`parity:1-8` → `probe:parity:1-16`: the trained levels and as many again, up to the probe's longest level
    (chase: its budget of names, the longest chain a sequence holds)."""
    spec = parse_probe(probe)
    return spec.at_levels(spec.levels[0], min(2 * spec.levels[-1], spec.probe.max_level)).name


def mean_recur(probe: str) -> int:
    """r̄ of the recursive model `probe` trains."""
    return probe_model(parse_probe(probe).probe.name, "").mean_recur


def depths(probe: str) -> str:
    r = mean_recur(probe)
    return ",".join(str(d) for d in (1, 2, r, 2 * r, 4 * r))


def run_dir(out: Path, probe: str, model: str) -> Path:
    return out / "probes" / f"{parse_probe(probe).probe.name}-{model}"


def eval_file(out: Path, probe: str, model: str) -> Path:
    return out / f"eval-probe-{parse_probe(probe).probe.name}-{model}.json"


def curriculum(probe: str, sp) -> list[tuple[ProbeSpec, int]]:
    """(spec, steps) of each training stage of `probe`: one stage of `sp.probe_steps` on its own levels, or for
    pointer chasing one stage per hop count, chains of lo..lo, lo..lo+1, … up to its own, with `sp.chase_steps`."""
    spec = parse_probe(probe)
    if spec.probe.name != "chase":
        return [(spec, sp.probe_steps)]
    lo, hi = spec.levels[0], spec.levels[-1]
    if len(sp.chase_steps) != hi - lo + 1:
        raise UserError(f"speedrun probe {probe}: its {hi - lo + 1} curriculum stages need as many chase_steps, "
                        f"got {len(sp.chase_steps)}")
    return [(spec.at_levels(lo, top), steps) for top, steps in zip(range(lo, hi + 1), sp.chase_steps)]


def train_probe(out: Path, probe: str, model: str, standard: str, sp, dtype: str, run_stage) -> None:
    """Every training stage of `probe` on one model: the last in `run_dir`, each earlier one beside it, named by its
    levels (`probes/chase-recursive-1-1`)."""
    name, stages, base = parse_probe(probe).probe.name, curriculum(probe, sp), None
    for i, (spec, steps) in enumerate(stages):
        last, levels = i == len(stages) - 1, f"{spec.levels[0]}-{spec.levels[-1]}"
        run = run_dir(out, probe, model)
        run = run if last else run.with_name(f"{run.name}-{levels}")
        settings = {"data": spec.name, "max_steps": steps, "dtype": dtype, "save_every": max(50, steps // 10)}
        if i > 0 and not standard and name in HINT_WEIGHTS:
            settings["hint_weight"] = HINT_WEIGHTS[name]
        run_stage(out, f"probe {name} {model}" + ("" if last else f" {levels}"),
                  lambda run=run, base=base, settings=settings: train_or_resume(
                      run, lambda: stage_spec(run, base, name, standard, settings)))
        base = run


def stage_spec(run: Path, base: Path | None, name: str, standard: str, settings: dict):
    """A probe's first stage from the preset (with the probe's model overrides and rates); a later one from the
    weights and settings of the stage before it."""
    if base is None:
        return pretrain_spec(PRESET, run, standard=standard, model=MODEL_OVERRIDES.get(name, {}),
                             train={**RATES.get(name, {}), **settings}, overwrite=True)
    return init_spec(base, run, train=settings, overwrite=True)


def probe_stages(out: Path, sp, models, dtype: str, run_stage) -> None:
    """Train, calibrate and evaluate every probe of the speedrun preset `sp` (stages skipped once done)."""
    for probe in sp.probes:
        name = parse_probe(probe).probe.name
        for model, standard in models:
            train_probe(out, probe, model, standard, sp, dtype, run_stage)
        recursive = run_dir(out, probe, "recursive")
        run_stage(out, f"calibrate probe {name}", lambda recursive=recursive, probe=probe: calibrate(
            recursive, probe, sp.probe_limit, EVAL_DTYPE))
        for model, standard in models:
            run_stage(out, f"eval probe {name} {model}", lambda model=model, standard=standard, probe=probe:
                      evaluate_checkpoint(EvalRequest(
                          ckpt=str(run_dir(out, probe, model)), tasks=held_out(probe), recur=depths(probe),
                          exit=None if standard or checkpoint.calibrated_exit(recursive) is None else "auto",
                          limit=sp.probe_limit, quiet=True, dtype=EVAL_DTYPE, json=str(eval_file(out, probe, model)))))


def calibrate(run: Path, probe: str, limit: int, dtype: str) -> None:
    """The probe-calibrated exit of the recursive model: the latent criterion, else a gate trained on the probe's
    labels (a state can sit still before the answer reaches its position, as in parity, and no latent threshold
    then keeps the accuracy); when neither does (an undertrained model), say so and evaluate at fixed depths only."""
    for criterion in CRITERIA:
        try:
            if criterion == "gate":
                train_exit_gate(str(run), probe=held_out(probe), deep_recur=4 * mean_recur(probe), label="answer",
                                dtype=dtype)  # labels from the depth the exit is calibrated against
            calibrate_probe_checkpoint(str(run), held_out(probe), criterion, MAX_ACC_LOSS, limit=limit, dtype=dtype)
            return
        except UserError as e:
            print(f"[speedrun] {probe}: no calibrated {criterion} exit ({e})", flush=True)


class ProbeNumbers:
    """One probe's figures for the card, read from the three models' eval files."""

    def __init__(self, out: Path, probe: str, models):
        self.probe, self.task = probe, held_out(probe)
        self.trained = parse_probe(probe).levels
        self.results = {m: EvalResult.from_json(json.loads(eval_file(out, probe, m).read_text())) for m, _ in models}
        self.r_bar = mean_recur(probe)

    def by_level(self, model: str, setting: str) -> dict[str, float]:
        return self.results[model].acc_by_difficulty[self.task].get(setting, {})

    def mean(self, model: str, setting: str, levels) -> float | None:
        values = [v for d, v in self.by_level(model, setting).items() if int(d) in levels]
        return sum(values) / len(values) if values else None

    @property
    def long_levels(self) -> list[int]:
        top = int(self.task.rsplit("-", 1)[1])
        return list(range(self.trained[-1] + 1, top + 1))

    def exit_setting(self) -> str | None:
        return next(iter(self.results["recursive"].exit), None)

    def exit_recursions(self) -> dict[str, float]:
        return {d: v.mean_recursions for d, v in self.results["recursive"].by_difficulty[self.task].items()}

    def points_lost(self, setting: str, levels) -> float:
        """Accuracy points the recursive model loses under `setting` against fixed 4r̄ on `levels`."""
        return 100 * ((self.mean("recursive", str(4 * self.r_bar), levels) or 0)
                      - (self.mean("recursive", setting, levels) or 0))


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def probe_rows(p: ProbeNumbers) -> list[str]:
    """Table rows for one probe: each model's accuracy on trained and held-out levels, by r."""
    r, deep, hard = str(p.r_bar), str(4 * p.r_bar), [p.trained[-1]]
    rows = []
    for model, result in p.results.items():
        rec = model == "recursive"
        curve = [p.mean(model, d, p.long_levels) for d in result.tasks[p.task] if d.isdigit()]
        monotone = rec and curve[-1] > curve[0] + RISE_TOLERANCE and all(
            a <= b + RISE_TOLERANCE for a, b in zip(curve, curve[1:]))
        rows.append(f"| {p.probe} | {LABELS[model]} | {fmt(p.mean(model, r if rec else '1', p.trained))} | "
                    f"{fmt(p.mean(model, '1', hard))} / {fmt(p.mean(model, r if rec else '1', hard))} | "
                    f"{fmt(p.mean(model, r if rec else '1', p.long_levels))} | "
                    f"{fmt(p.mean(model, deep, p.long_levels) if rec else None)} | "
                    f"{('yes' if monotone else 'no') if rec else '—'} |")
    return rows


def comparison(p: ProbeNumbers) -> str:
    """One sentence: where the recursive model is ahead of (or behind) the better standard model, held out at 4r̄
    (which only it can run) and on the trained levels at r̄."""
    standard, said = [m for m in p.results if m != "recursive"], []
    for levels, setting, where in ((p.long_levels, str(4 * p.r_bar), "held-out levels at 4r̄"),
                                   (p.trained, str(p.r_bar), "trained levels at r̄")):
        rec = p.mean("recursive", setting, levels) or 0.0
        best = max(standard, key=lambda m: p.mean(m, "1", levels) or 0.0)
        other = p.mean(best, "1", levels) or 0.0
        said.append(f"{where} {rec:.3f} against {other:.3f} for the {LABELS[best]} ({100 * (rec - other):+.1f} points)")
    return f"`{p.probe}`, recursive model: " + "; ".join(said) + "."


def exit_row(p: ProbeNumbers) -> str:
    setting = p.exit_setting()
    if setting is None:
        return f"| {p.probe} | (no calibrated exit) | | | | | |"
    spent = p.exit_recursions()
    first, easy, hard = str(p.trained[0]), str(p.long_levels[0]), str(p.long_levels[-1])
    every = p.trained + p.long_levels
    return (f"| {p.probe} | `{setting}` | {spent[first]:.2f} | {spent[easy]:.2f} → {spent[hard]:.2f} "
            f"({spent[hard] / max(spent[easy], 1e-9):.2f}×) | {spent[hard] / max(spent[first], 1e-9):.2f}× | "
            f"{fmt(p.mean('recursive', setting, p.long_levels))} | "
            f"{p.points_lost(setting, every):+.1f} / {p.points_lost(setting, p.long_levels):+.1f} |")


def recipe(probe: str, sp) -> str:
    """How the card says `probe` was trained, from the same curriculum the stages ran."""
    stages, name, r = curriculum(probe, sp), parse_probe(probe).probe.name, mean_recur(probe)
    if len(stages) == 1:
        return f"`{probe}`: {stages[0][1]} steps, r̄ = {r}."
    blocks = "/".join(str(getattr(probe_model(name, ""), f"n_{k}")) for k in ("prelude", "shared", "coda"))
    flop, params = (probe_model(name, kind).n_prelude for kind in ("iso-flops", "iso-params"))
    steps = ", then ".join(f"{spec.levels[0]}-{spec.levels[-1]} for {n}" for spec, n in stages)
    hints = (f"; from the second stage on the recursive model also learns from hints (`--hint-weight "
             f"{HINT_WEIGHTS[name]:g}`: the readout after iteration i trained on the name its chain reaches after "
             f"i − 1 look-ups)" if name in HINT_WEIGHTS else "")
    return (f"`{probe}`: a curriculum, chains of {steps} steps, each stage from the last one's weights, at "
            f"{RATES[name]['lr_matrix'] / get_preset(PRESET).train.lr_matrix:g}× the preset's rates; "
            f"r̄ = {r}, full attention, every block in the loop (P/R/C = {blocks}; the iso-FLOP twin {flop} blocks, "
            f"iso-params {params}){hints}.")


def probe_model(name: str, standard: str):
    """The model a probe trains: the preset with the probe's overrides, or its standard twin."""
    cfg = dataclasses.replace(get_preset(PRESET).model, **MODEL_OVERRIDES.get(name, {}))
    return cfg.twin(standard) if standard else cfg


def card_section(out: Path, sp, models) -> list[str]:
    """The card's opening: what depth does on the probes, in tables and heat maps."""
    numbers = [ProbeNumbers(out, probe, models) for probe in sp.probes]
    lines = ["## Depth that does work: the probes", "",
             "Each probe trained from scratch (`recurchat train --preset probe`) on the levels in its name, evaluated "
             "on twice as many (the rest never trained), the recursive model at r = 1, 2, r̄, 2r̄ and 4r̄. Standard "
             "models run once (r = 1).",
             "", *[f"- {recipe(probe, sp)}" for probe in sp.probes], "",
             "| probe | model | trained levels at r̄ | longest trained level, r = 1 / r̄ | held-out levels at r̄ | "
             f"at 4r̄ | held-out rises with r (drops ≤ {RISE_TOLERANCE} allowed) |",
             "|---|---|---:|---:|---:|---:|---|",
             *[row for p in numbers for row in probe_rows(p)], "",
             "Against the better standard model on each side (standard models at r = 1):", "",
             *[f"- {comparison(p)}" for p in numbers], "",
             "Recursive model under the exit calibrated on each probe (the latent criterion, or where no latent "
             "threshold holds a gate trained on the probe's labels; accuracy loss over all levels ≤ 1 point "
             "against fixed 4r̄ at 95% confidence, on sequences the evaluation does not use): mean recursions per "
             "label, and the points it loses against 4r̄ over all levels and over the held-out ones.", "",
             "| probe | exit | easiest level | held-out easiest → hardest | hardest held-out ÷ easiest level | "
             "held-out acc | acc lost vs 4r̄, all / held-out (points) |",
             "|---|---|---:|---:|---:|---:|---:|", *[exit_row(p) for p in numbers], ""]
    for p in numbers:
        figure = f"heatmap-{parse_probe(p.probe).probe.name}.png"
        plot_accuracy_heatmaps(p.results["recursive"], out / figure, title="recursive: ")
        lines += [f"![{p.probe}: accuracy by difficulty × r]({figure})", ""]
    return lines
