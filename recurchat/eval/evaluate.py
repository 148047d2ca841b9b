"""`recurchat eval` as a library call: load a checkpoint, sweep tasks × r × exit, print, write JSON and a report.

    recurchat eval --ckpt runs/tiny-sft --tasks bpb,hops --recur 1,2,4,8 --exit kl:3e-2 --json eval.json
    evaluate_checkpoint(EvalRequest(ckpt="runs/tiny-sft", tasks="bpb,hops", json="eval.json"))   # the speedrun

Every field of EvalRequest is the flag of the same name. Exercised by `pytest tests/eval tests/test_speedrun.py`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from recurchat import checkpoint
from recurchat.checkpoint import Checkpoint
from recurchat.data.corpus import prepare_data
from recurchat.errors import UserError
from recurchat.eval.report import write_report
from recurchat.eval.grid import GridSettings, print_table, run_sweep
from recurchat.eval.result import EvalResult
from recurchat.eval.tasks import parse_task_specs
from recurchat.files import atomic_write_json
from recurchat.infer.exit import ExitCriterion
from recurchat.model import hardware


@dataclass
class EvalRequest:
    ckpt: str
    tasks: str = "bpb"
    recur: str = "1,2,4,8"
    exit: str | None = None
    limit: int = 200
    seed: int = 0
    max_tokens: int = 16
    report: str | None = None
    baseline: str | None = None
    quiet: bool = False
    json: str | None = None
    data: str | None = None
    eval_tokens: int = 0
    batch_size: int = 16
    dtype: str = "auto"
    device: str = "auto"
    max_recur: int | None = None
    kv: str = "full"
    harness: str | None = None  # lm-evaluation-harness tasks instead of --tasks
    harness_include: str | None = None  # a directory of extra lm-eval task YAMLs (local tasks)


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad recursion list {text!r}: expected comma-separated integers like 1,2,4,8") from None
    if not depths or min(depths) < 1:
        raise UserError(f"bad recursion list {text!r}: each r must be >= 1")
    return depths


def heldout_source(ckpt: Checkpoint, override: str | None) -> str | None:
    """The text bpb is measured on: `--data`, else the text the checkpoint pretrained on; an SFT checkpoint's data
    is conversations (or builtin tasks), so its held-out text is the embedded corpus (None)."""
    if override is not None:
        return override
    own = ckpt.train_cfg.data if ckpt.train_cfg.stage == "pretrain" else ""
    return None if not own or own.startswith("builtin:") else own


def read_baseline(path: str | None) -> EvalResult | None:
    """`--baseline FILE`: a standard model's `recurchat eval --json` output."""
    if not path:
        return None
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--baseline {path}: cannot read JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"--baseline {path}: not a `recurchat eval --json` result (a JSON object)")
    return EvalResult.from_json(d)


def evaluate_with_harness(req: EvalRequest) -> dict:
    """`recurchat eval --harness TASKS`: lm-evaluation-harness on this checkpoint at each --recur and each --exit;
    {"harness": {"r=4" | "kl:0.001": lm-eval's results per task}}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from recurchat.eval.harness import RecurchatLM
    except ImportError as e:
        raise UserError(f"--harness needs lm-evaluation-harness (pip install lm-eval): {e}") from None
    tasks = [t.strip() for t in req.harness.split(",") if t.strip()]
    settings = [{"recur": r} for r in parse_depths(req.recur)] + \
        [{"exit": e.strip()} for e in (req.exit or "").split(",") if e.strip()]
    if not checkpoint.load(req.ckpt).model_cfg.recursive:
        print("note: standard model (n_shared = 0): evaluated at r = 1 only; exit criteria skipped", file=sys.stderr)
        settings = [{"recur": 1}]
    manager = TaskManager(include_path=req.harness_include) if req.harness_include else None
    out: dict = {"harness": {}, "checkpoint": str(checkpoint.resolve(req.ckpt)), "tasks": tasks}
    for setting in settings:
        lm = RecurchatLM(req.ckpt, **setting, max_recur=req.max_recur, kv=req.kv, dtype=req.dtype,
                         device=req.device, batch_size=req.batch_size, max_gen_toks=req.max_tokens)
        name = f"r={setting['recur']}" if "recur" in setting else lm.recur.exit
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=req.limit or None,
                                          log_samples=False)
        out["harness"][name] = results["results"]
        print(f"# {name}\n{make_table(results)}")
    if req.json:
        atomic_write_json(req.json, out)
    return out


def evaluate_checkpoint(req: EvalRequest) -> EvalResult | dict:
    """Run the sweep `req` describes (an EvalResult; with --harness, lm-eval's results as a dict); bad task names,
    depths and exit criteria fail before the model loads."""
    if req.harness:
        return evaluate_with_harness(req)
    specs = [t.strip() for t in req.tasks.split(",") if t.strip()]
    parsed = parse_task_specs(specs)
    depths = parse_depths(req.recur)
    exits = [checkpoint.resolve_exit(e.strip(), req.ckpt) for e in (req.exit or "").split(",") if e.strip()]
    for spec in exits:
        ExitCriterion.parse(spec)
    ckpt, model = checkpoint.load_model(req.ckpt, req.device)
    cfg, tok = ckpt.model_cfg, ckpt.tokenizer
    device = next(model.parameters()).device
    dtype = hardware.choose_dtype(req.dtype, device)
    print(hardware.inference_banner(device, dtype, cfg), file=sys.stderr)
    too_deep = [r for r in depths if r > cfg.r_max]
    if too_deep and cfg.recursive:
        print(f"note: r = {too_deep} exceed the trained r_max = {cfg.r_max}; evaluating anyway", file=sys.stderr)
    val = None
    if any(s.kind == "bpb" for s in parsed):
        val = prepare_data(heldout_source(ckpt, req.data), cfg.vocab_size, tokenizer=tok,
                           log=lambda *a, **k: print(*a, file=sys.stderr, **k)).val
    eval_tokens = req.eval_tokens or ckpt.train_cfg.eval_tokens
    grid = GridSettings(specs, depths, exits, limit=req.limit, seed=req.seed, max_recur=req.max_recur,
                        batch_size=req.batch_size, bpb_tokens=eval_tokens, max_tokens=req.max_tokens, kv=req.kv,
                        dtype=dtype.name, progress=not req.quiet)
    result = run_sweep(model, tok, val, tok.token_bytes(), grid, exit_gate=checkpoint.load_exit_gate(ckpt.path))
    result.extra.update({**({"bpb": result.tasks["bpb"]} if "bpb" in result.tasks else {}),
                         "model": dataclasses.asdict(cfg), "eval_tokens": eval_tokens, "checkpoint": str(ckpt.path)})
    print(print_table(result))
    if req.json:
        atomic_write_json(req.json, result.to_json())
    if req.report:
        path = write_report(result, req.report, title=f"recurchat eval: {ckpt.path}",
                            baseline=read_baseline(req.baseline))
        print(f"report: {path}", file=sys.stderr)
    return result
