"""Task × recursion-depth × exit-criterion sweeps, and the plain-text table that summarises one.

    recurchat eval --ckpt DIR --tasks bpb,hops,arc-easy:data/arc_easy.jsonl --recur 1,2,4,8 --exit kl:0.03

`run_sweep` returns an EvalResult (eval/result.py) whose `to_json()` is (keys of depths are strings, e.g. "4"):
    tasks          {task: {r: accuracy}}, and {"bpb": {r: bits per byte}}
    exit           {criterion: {"acc": {task: accuracy}, "bpb": x (only with bpb), "mean_recursions": x,
                                "mean_recursions_by_task": {task: x}}}
    by_difficulty  {builtin task or probe: {difficulty: {"acc": x, "mean_recursions": y}}}, under the first exit
                   criterion, else at r̄
    acc_by_difficulty  {builtin task or probe: {r or criterion: {difficulty: accuracy}}}: every setting, by level
    trajectory     {probe: {"rel_change": {difficulty: [‖s_i − s_{i−1}‖/‖s_i‖ per iteration]}, "settle": {difficulty:
                   mean iteration from which the answer stops changing}, "depth": deepest r}} (eval/probes.py)
    centered_mean  {r or criterion: mean over tasks (bpb excluded) of (acc − chance) / (1 − chance)}
    chance         {task: accuracy of guessing}
    params         total parameter count
    acc_norm       {multiple-choice task: {r or criterion: length-normalised accuracy}}
    settings       the arguments that shaped the run (depths, exits, limit, seed, …, examples per task)
    notes          human-readable caveats (e.g. a standard model is evaluated at r = 1 only)
Mean recursions count recurrent-block applications per token: per generated token (the closing
<|assistant_end|> included) for generative tasks, per scored choice token for multiple choice, per held-out token
for bpb. An exit's headline `mean_recursions` is bpb's when bpb was evaluated (the text-wide compute figure the
rest of recurchat reports), else the mean over tasks. Exercised by `pytest tests/eval/test_eval_report.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from recurchat.data.tasks import get_task, stream
from recurchat.data.tasks.benchmarks import load_benchmark
from recurchat.data.tasks.probes import parse_probe
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.eval import probes
from recurchat.eval.bpb import evaluate_bpb, evaluate_bpb_exit
from recurchat.eval.result import EvalResult
from recurchat.eval.tasks import TaskSpec, centered, eval_generative, mc_chance, parse_task_specs, score_mc
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.exit import ExitCriterion
from recurchat.model.recurrent import RecurrentLM

# A worked GSM8K solution runs far past the few tokens a procedural answer needs; 16 would cut nearly all of them.
GSM8K_MAX_TOKENS = 128


def _load(spec: TaskSpec, limit: int, seed: int) -> tuple[list, float]:
    """(examples, chance) for one accuracy task."""
    if spec.kind == "builtin":
        task = get_task(spec.name)
        return stream(task, "test", seed, limit), float(task.chance)
    if spec.kind == "probe":
        probe = parse_probe(spec.name)
        return probes.eval_batch(probe, limit, seed), float(probe.probe.chance)
    questions = load_benchmark(spec.name, spec.path)[:limit]
    return questions, (mc_chance(questions) if spec.kind == "mc" else 0.0)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _token_mean_depth(results: list[dict]) -> float:
    """Recursions per token over all tokens (generative) or per question (multiple choice, already a mean)."""
    if results and "depths" in results[0]:
        total = sum(len(r["depths"]) for r in results)
        return sum(sum(r["depths"]) for r in results) / total if total else 0.0
    return _mean([r["mean_depth"] for r in results])


def _by_difficulty(results: list[dict]) -> dict[str, dict[str, float]]:
    groups: dict[int, list[dict]] = {}
    for r in results:
        groups.setdefault(r["difficulty"], []).append(r)
    return {str(d): {"acc": _mean([float(r["correct"]) for r in rs]), "mean_recursions": _token_mean_depth(rs)}
            for d, rs in sorted(groups.items())}


@dataclass(frozen=True)
class GridSettings:
    """What shapes one task × r × exit evaluation (`run_sweep`), built once by its caller (`recurchat eval`).

    `limit` caps examples per task (builtin tasks: a seeded test stream of uniform difficulty; benchmarks: the first
    `limit` questions); `bpb_tokens` caps held-out tokens for bpb (None: all of them); `max_recur` caps an exit
    criterion's depth (None: r_max)."""

    specs: Sequence[str]
    depths: Sequence[int]
    exits: Sequence[str] = ()
    limit: int = 100
    seed: int = 0
    max_recur: int | None = None
    batch_size: int = 16
    bpb_tokens: int | None = None
    mc_mode: str = "loglik"
    max_tokens: int = 16
    kv: str = "full"
    dtype: str = "auto"
    progress: bool = True


@dataclass
class Sweep:
    """What every (task, setting) evaluation of one sweep shares; `evaluate` caches each pair's raw results."""

    model: RecurrentLM
    tokenizer: Tokenizer
    engine: Engine
    val_tokens: np.ndarray | None
    token_bytes: torch.Tensor | None
    data: dict[str, tuple[list, float]]  # accuracy tasks: (examples, chance)
    settings: GridSettings
    exit_cap: int
    cache: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def kv(self) -> str:
        return self.settings.kv

    def recur_of(self, setting: str) -> RecurParams:
        cfg = self.model.cfg
        if ":" in setting:
            return RecurParams(exit=setting, max_recur=self.exit_cap, kv=self.kv).validate(cfg)
        return RecurParams(num_recur=int(setting), kv=self.kv).validate(cfg)

    def evaluate(self, spec: TaskSpec, setting: str):
        key = (spec.name, setting)
        if key not in self.cache:
            self.cache[key] = self._run(spec, self.recur_of(setting))
        return self.cache[key]

    def _run(self, spec: TaskSpec, recur: RecurParams):
        engine, seq_len = self.engine, self.model.cfg.seq_len
        adaptive = recur.exit is not None
        if spec.kind == "bpb" and adaptive:
            return evaluate_bpb_exit(engine, self.val_tokens, self.token_bytes, self.batch_size, seq_len,
                                     self.settings.bpb_tokens, recur)
        if spec.kind == "bpb":
            return (evaluate_bpb(self.model, self.val_tokens, self.token_bytes, self.batch_size, seq_len,
                                 self.settings.bpb_tokens, num_recur=recur.num_recur, dtype=engine.dtype),
                    float(recur.num_recur))
        if spec.kind == "probe" and adaptive:
            return probes.score_exit(engine, self.data[spec.name][0], recur, self.batch_size)
        if spec.kind == "probe":
            return probes.score_fixed(self.model, self.data[spec.name][0], recur.num_recur, engine.dtype,
                                      self.batch_size)
        if spec.kind == "mc":
            return score_mc(self.model, self.tokenizer, self.data[spec.name][0], recur.num_recur, self.settings.mc_mode,
                            self.batch_size, engine=engine if adaptive else None,
                            recur=recur if adaptive else None, dtype=engine.dtype)
        n_tokens = self.settings.max_tokens
        n_tokens = max(GSM8K_MAX_TOKENS, n_tokens) if spec.kind == "gen" else n_tokens
        return eval_generative(engine, self.tokenizer, self.data[spec.name][0], recur, n_tokens, self.batch_size)


def checked_settings(cfg, depths: Sequence[int], exits: Sequence[str], limit: int) -> tuple[list, list, list]:
    """(depths, exit criteria, notes), deduplicated and checked before minutes of evaluation, not after."""
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    depths = list(dict.fromkeys(int(r) for r in depths))  # a repeated depth would be evaluated twice
    if not depths or any(r < 1 for r in depths):
        raise UserError(f"recursion depths must be >= 1, got {depths}")
    exits = list(dict.fromkeys(e.strip() for e in exits if e.strip()))
    for spec in exits:
        ExitCriterion.parse(spec)
    notes: list[str] = []
    if cfg.n_shared == 0:
        if depths != [1] or exits:
            notes.append("standard model (n_shared = 0): evaluated at r = 1 only; exit criteria skipped")
        depths, exits = [1], []
    return depths, exits, notes


def record(result: dict, entry: dict, spec: TaskSpec, setting: str, out) -> None:
    """File one (task, setting) outcome under result["tasks"] (fixed r) or the exit `entry` (a criterion)."""
    adaptive = ":" in setting
    if spec.kind == "bpb":
        bpb, mean_r = out
        if adaptive:
            entry["bpb"], entry["bpb_mean_recursions"] = bpb, mean_r
        else:
            result["tasks"].setdefault("bpb", {})[setting] = bpb
        return
    acc = _mean([float(r["correct"]) for r in out])
    if adaptive:
        entry["acc"][spec.name] = acc
        entry["mean_recursions_by_task"][spec.name] = _token_mean_depth(out)
    else:
        result["tasks"].setdefault(spec.name, {})[setting] = acc
    if spec.kind == "mc":
        result["acc_norm"].setdefault(spec.name, {})[setting] = _mean([float(r["correct_norm"]) for r in out])


def close_exit_entry(entry: dict) -> dict:
    """An exit's headline mean_recursions: bpb's when bpb ran (the text-wide figure), else the mean over tasks."""
    bpb_r = entry.pop("bpb_mean_recursions", None)
    entry["mean_recursions"] = bpb_r if bpb_r is not None else _mean(list(entry["mean_recursions_by_task"].values()))
    return entry


def centered_means(result: dict, settings: list[str]) -> dict:
    out = {}
    for setting in settings:
        accs = (result["exit"][setting]["acc"] if ":" in setting else
                {n: v[setting] for n, v in result["tasks"].items() if n != "bpb"})
        if accs:
            out[setting] = _mean([centered(a, result["chance"][n]) for n, a in accs.items()])
    return out


def run_sweep(model: RecurrentLM, tokenizer: Tokenizer, val_tokens: np.ndarray | None, token_bytes: torch.Tensor | None,
              grid: GridSettings, exit_gate=None) -> EvalResult:
    """Evaluate every task of `grid` at every fixed depth and every exit criterion; see the module docstring for the
    sections. `val_tokens` / `token_bytes`: held-out text for bpb (token_bytes None: the tokenizer's)."""
    cfg, limit, seed = model.cfg, grid.limit, grid.seed
    parsed = parse_task_specs(grid.specs)
    depths, exits, notes = checked_settings(cfg, grid.depths, grid.exits, limit)
    if any(s.kind == "bpb" for s in parsed):
        if val_tokens is None or len(val_tokens) < 2:
            raise UserError("bpb needs held-out tokens (val_tokens is empty)")
        token_bytes = tokenizer.token_bytes() if token_bytes is None else token_bytes
    data = {s.name: _load(s, limit, seed) for s in parsed if s.has_accuracy}
    for s in parsed:
        if s.kind == "probe":
            probes.check_vocabulary(parse_probe(s.name), tokenizer, model)
    was_training = model.training
    engine = Engine(model, dtype=grid.dtype, exit_gate=exit_gate)
    sweep = Sweep(model, tokenizer, engine, val_tokens, token_bytes, data, grid, grid.max_recur or cfg.r_max)
    # r̄ (or r = 1 for the standard model) is where by_difficulty is measured when no exit criterion is given
    diff_setting = exits[0] if exits else str(1 if cfg.n_shared == 0 else cfg.mean_recur)
    settings = [str(r) for r in depths] + exits
    builtin = [s for s in parsed if s.kind in ("builtin", "probe")]
    extra = builtin if diff_setting not in settings else []
    result: dict = {"tasks": {}, "exit": {}, "by_difficulty": {}, "acc_by_difficulty": {}, "centered_mean": {},
                    "chance": {}, "params": int(model.num_params()["total"]), "acc_norm": {}, "trajectory": {}}
    try:
        with tqdm(total=len(parsed) * len(settings) + len(extra), desc="eval", disable=not grid.progress,
                  leave=False) as bar:
            for setting in settings:
                entry: dict = {"acc": {}, "mean_recursions_by_task": {}}
                for spec in parsed:
                    bar.set_postfix_str(f"{spec.name} @ {setting if ':' in setting else 'r=' + setting}")
                    record(result, entry, spec, setting, sweep.evaluate(spec, setting))
                    bar.update(1)
                if ":" in setting:
                    result["exit"][setting] = close_exit_entry(entry)
            for spec in builtin:
                bar.set_postfix_str(f"{spec.name} by difficulty @ {diff_setting}")
                result["by_difficulty"][spec.name] = _by_difficulty(sweep.evaluate(spec, diff_setting))
                bar.update(1 if spec in extra else 0)
                result["acc_by_difficulty"][spec.name] = {  # cached: no generation beyond the settings above
                    s: {d: v["acc"] for d, v in _by_difficulty(sweep.evaluate(spec, s)).items()} for s in settings}
            if model.recur:
                for spec in (s for s in parsed if s.kind == "probe"):
                    result["trajectory"][spec.name] = probes.trajectory(model, data[spec.name][0], max(depths),
                                                                        engine.dtype)
    finally:
        model.train(was_training)
    result["chance"] = {name: chance for name, (_, chance) in data.items()}
    result["centered_mean"] = centered_means(result, settings)
    result["settings"] = {"depths": depths, "exits": exits, "limit": limit, "seed": seed, "max_recur": sweep.exit_cap,
                          "mc_mode": grid.mc_mode, "by_difficulty_at": diff_setting, "mean_recur": cfg.mean_recur,
                          "n_examples": {name: len(examples) for name, (examples, _) in data.items()}}
    result["notes"] = notes
    return EvalResult.from_json(result)


# ---- tables -------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fixed_table(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per task (bpb last) plus the centred mean; one column per fixed depth r."""
    depth_keys: list[str] = []
    for values in result.tasks.values():
        depth_keys += [k for k in values if k not in depth_keys]
    depth_keys.sort(key=lambda k: (0, int(k)) if k.isdigit() else (1, k))
    header = ["task", *(f"r={k}" for k in depth_keys)]
    names = result.accuracy_tasks() + (["bpb"] if "bpb" in result.tasks else [])
    rows = [[name, *(_fmt(result.tasks[name].get(k), 4 if name == "bpb" else 3) for k in depth_keys)]
            for name in names]
    if any(k in result.centered_mean for k in depth_keys):
        rows.append(["centered mean", *(_fmt(result.centered_mean.get(k)) for k in depth_keys)])
    return header, rows


def exit_table(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per exit criterion with its mean recursions, bpb, task accuracies, centred mean."""
    names: list[str] = []
    for entry in result.exit.values():
        names += [n for n in entry.acc if n not in names]
    has_bpb = any(e.bpb is not None for e in result.exit.values())
    header = ["exit", "mean r", *(["bpb"] if has_bpb else []), *names, "centered mean"]
    rows = [[spec, _fmt(entry.mean_recursions, 2), *([_fmt(entry.bpb, 4)] if has_bpb else []),
             *(_fmt(entry.acc.get(n)) for n in names), _fmt(result.centered_mean.get(spec))]
            for spec, entry in result.exit.items()]
    return header, rows


def _plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in (header, *rows)]
    return "\n".join(lines)


def print_table(result: EvalResult) -> str:
    """The sweep as plain text (task × r, then one row per exit criterion); returns it rather than printing."""
    parts = []
    header, rows = fixed_table(result)
    if rows:
        parts.append(_plain(header, rows))
    header, rows = exit_table(result)
    if rows:
        parts.append(_plain(header, rows))
    parts += [f"note: {n}" for n in result.notes]
    return "\n\n".join(parts)
