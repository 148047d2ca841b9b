"""Task × recursion-depth × exit-criterion sweeps, and the plain-text table that summarises one.

    recurchat eval --ckpt DIR --tasks bpb,hops,arc-easy:data/arc_easy.jsonl --recur 1,2,4,8 --exit kl:0.03

`run_sweep` returns a JSON-ready dict (keys of depths are strings, e.g. "4"):
    tasks          {task: {r: accuracy}}, and {"bpb": {r: bits per byte}}
    exit           {criterion: {"acc": {task: accuracy}, "bpb": x (only with bpb), "mean_recursions": x,
                                "mean_recursions_by_task": {task: x}}}
    by_difficulty  {builtin task: {difficulty: {"acc": x, "mean_recursions": y}}}, under the first exit criterion,
                   else at r̄
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

import numpy as np
import torch
from tqdm import tqdm

from recurchat.data.tasks import get_task, stream
from recurchat.data.tasks.benchmarks import load_benchmark
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.eval.bpb import evaluate_bpb, evaluate_bpb_exit
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


def run_sweep(model: RecurrentLM, tokenizer: Tokenizer, val_tokens: np.ndarray | None, token_bytes: torch.Tensor | None,
              specs: Sequence[str], depths: Sequence[int], exits: Sequence[str], limit: int, seed: int = 0,
              max_recur: int | None = None, progress: bool = True, *, batch_size: int = 16,
              bpb_tokens: int | None = None, mc_mode: str = "loglik", max_tokens: int = 16, kv: str = "full",
              dtype: str = "auto") -> dict:
    """Evaluate every task at every fixed depth and every exit criterion; see the module docstring for the dict.

    `limit` caps examples per task (builtin tasks: a seeded test stream of uniform difficulty; benchmarks: the
    first `limit` questions). `bpb_tokens` caps held-out tokens for bpb (None: all of `val_tokens`).
    """
    cfg = model.cfg
    parsed = parse_task_specs(specs)
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    depths = list(dict.fromkeys(int(r) for r in depths))  # a repeated depth would be evaluated twice
    if not depths or any(r < 1 for r in depths):
        raise UserError(f"recursion depths must be >= 1, got {depths}")
    exits = list(dict.fromkeys(e.strip() for e in exits if e.strip()))
    for spec in exits:
        ExitCriterion.parse(spec)  # a typo fails before minutes of evaluation, not after
    notes: list[str] = []
    if cfg.n_recur == 0:
        if depths != [1] or exits:
            notes.append("standard model (n_recur = 0): evaluated at r = 1 only; exit criteria skipped")
        depths, exits = [1], []
    if any(s.kind == "bpb" for s in parsed):
        if val_tokens is None or len(val_tokens) < 2:
            raise UserError("bpb needs held-out tokens (val_tokens is empty)")
        token_bytes = tokenizer.token_bytes() if token_bytes is None else token_bytes

    data: dict[str, tuple[list, float]] = {s.name: _load(s, limit, seed) for s in parsed if s.has_accuracy}
    was_training = model.training
    engine = Engine(model, dtype=dtype)  # puts the model in eval mode; resolves `auto` for the device
    exit_cap = max_recur or cfg.r_max
    # r̄ (or r = 1 for the standard model) is where by_difficulty is measured when no exit criterion is given
    diff_setting = exits[0] if exits else str(1 if cfg.n_recur == 0 else cfg.mean_recur)
    cache: dict[tuple[str, str], object] = {}

    def recur_of(setting: str) -> RecurParams:
        if ":" in setting:
            return RecurParams(exit=setting, max_recur=exit_cap, kv=kv)
        return RecurParams(num_recur=int(setting), kv=kv)

    def evaluate(spec: TaskSpec, setting: str):
        key = (spec.name, setting)
        if key in cache:
            return cache[key]
        recur = recur_of(setting)
        adaptive = recur.exit is not None
        if spec.kind == "bpb":
            if adaptive:
                out = evaluate_bpb_exit(engine, val_tokens, token_bytes, batch_size, cfg.seq_len, bpb_tokens, recur)
            else:
                out = (evaluate_bpb(model, val_tokens, token_bytes, batch_size, cfg.seq_len, bpb_tokens,
                                    num_recur=recur.num_recur, dtype=engine.dtype), float(recur.num_recur))
        elif spec.kind == "mc":
            out = score_mc(model, tokenizer, data[spec.name][0], recur.num_recur, mc_mode, batch_size,
                           engine=engine if adaptive else None, recur=recur if adaptive else None,
                           dtype=engine.dtype)
        else:
            n_tokens = max(GSM8K_MAX_TOKENS, max_tokens) if spec.kind == "gen" else max_tokens
            out = eval_generative(engine, tokenizer, data[spec.name][0], recur, n_tokens, batch_size)
        cache[key] = out
        return out

    settings = [str(r) for r in depths] + exits
    needs_extra = any(s.kind == "builtin" for s in parsed) and diff_setting not in settings
    total = len(parsed) * len(settings) + (sum(s.kind == "builtin" for s in parsed) if needs_extra else 0)
    result: dict = {"tasks": {}, "exit": {}, "by_difficulty": {}, "centered_mean": {}, "chance": {},
                    "params": int(model.num_params()["total"]), "acc_norm": {}}
    try:
        with tqdm(total=total, desc="eval", disable=not progress, leave=False) as bar:
            for setting in settings:
                adaptive = ":" in setting
                entry: dict = {"acc": {}, "mean_recursions_by_task": {}} if adaptive else {}
                for spec in parsed:
                    bar.set_postfix_str(f"{spec.name} @ {setting if adaptive else 'r=' + setting}")
                    out = evaluate(spec, setting)
                    bar.update(1)
                    if spec.kind == "bpb":
                        bpb, mean_r = out
                        if adaptive:
                            entry["bpb"], entry["bpb_mean_recursions"] = bpb, mean_r
                        else:
                            result["tasks"].setdefault("bpb", {})[setting] = bpb
                        continue
                    acc = _mean([float(r["correct"]) for r in out])
                    if adaptive:
                        entry["acc"][spec.name] = acc
                        entry["mean_recursions_by_task"][spec.name] = _token_mean_depth(out)
                    else:
                        result["tasks"].setdefault(spec.name, {})[setting] = acc
                    if spec.kind == "mc":
                        result["acc_norm"].setdefault(spec.name, {})[setting] = _mean(
                            [float(r["correct_norm"]) for r in out])
                if adaptive:
                    by_task = entry["mean_recursions_by_task"]
                    bpb_r = entry.pop("bpb_mean_recursions", None)
                    entry["mean_recursions"] = bpb_r if bpb_r is not None else _mean(list(by_task.values()))
                    result["exit"][setting] = entry
            for spec in parsed:
                if spec.kind == "builtin":
                    if needs_extra:
                        bar.set_postfix_str(f"{spec.name} by difficulty @ {diff_setting}")
                    result["by_difficulty"][spec.name] = _by_difficulty(evaluate(spec, diff_setting))
                    if needs_extra:
                        bar.update(1)
    finally:
        model.train(was_training)

    for name, (_, chance) in data.items():
        result["chance"][name] = chance
    for setting in settings:
        accs = (result["exit"][setting]["acc"] if ":" in setting else
                {n: v[setting] for n, v in result["tasks"].items() if n != "bpb"})
        if accs:
            result["centered_mean"][setting] = _mean([centered(a, result["chance"][n]) for n, a in accs.items()])
    result["settings"] = {"depths": depths, "exits": exits, "limit": limit, "seed": seed, "max_recur": exit_cap,
                          "mc_mode": mc_mode, "by_difficulty_at": diff_setting, "mean_recur": cfg.mean_recur,
                          "n_examples": {name: len(examples) for name, (examples, _) in data.items()}}
    result["notes"] = notes
    return result


# ---- tables -------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fixed_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per task (bpb last) plus the centred mean; one column per fixed depth r."""
    tasks = result.get("tasks") or {}
    depth_keys: list[str] = []
    for values in tasks.values():
        depth_keys += [k for k in values if k not in depth_keys]
    depth_keys.sort(key=lambda k: (0, int(k)) if k.isdigit() else (1, k))
    header = ["task", *(f"r={k}" for k in depth_keys)]
    names = [n for n in tasks if n != "bpb"] + (["bpb"] if "bpb" in tasks else [])
    rows = [[name, *(_fmt(tasks[name].get(k), 4 if name == "bpb" else 3) for k in depth_keys)] for name in names]
    centred = result.get("centered_mean") or {}
    if any(k in centred for k in depth_keys):
        rows.append(["centered mean", *(_fmt(centred.get(k)) for k in depth_keys)])
    return header, rows


def exit_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per exit criterion with its mean recursions, bpb, task accuracies, centred mean."""
    exits = result.get("exit") or {}
    names: list[str] = []
    for entry in exits.values():
        names += [n for n in (entry.get("acc") or {}) if n not in names]
    has_bpb = any("bpb" in e for e in exits.values())
    header = ["exit", "mean r", *(["bpb"] if has_bpb else []), *names, "centered mean"]
    rows = []
    for spec, entry in exits.items():
        acc = entry.get("acc") or {}
        rows.append([spec, _fmt(entry.get("mean_recursions"), 2), *([_fmt(entry.get("bpb"), 4)] if has_bpb else []),
                     *(_fmt(acc.get(n)) for n in names), _fmt((result.get("centered_mean") or {}).get(spec))])
    return header, rows


def _plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in (header, *rows)]
    return "\n".join(lines)


def print_table(result: dict) -> str:
    """The sweep as plain text (task × r, then one row per exit criterion); returns it rather than printing."""
    parts = []
    header, rows = fixed_table(result)
    if rows:
        parts.append(_plain(header, rows))
    header, rows = exit_table(result)
    if rows:
        parts.append(_plain(header, rows))
    parts += [f"note: {n}" for n in result.get("notes") or []]
    return "\n\n".join(parts)
