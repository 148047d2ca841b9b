"""The commands behind `recurchat <command>`: each parses nothing, resolves its arguments and calls one library
function (recurchat/cli/__init__.py builds the parser). Exercised by `pytest tests/test_cli_errors.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

from recurchat.config import ModelConfig, TrainConfig, get_preset
from recurchat.errors import UserError
from recurchat.files import atomic_write_json

if TYPE_CHECKING:
    from recurchat.train.telemetry import StepMetrics


def overrides(cls, args: argparse.Namespace) -> dict:
    """The fields of dataclass `cls` that the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def print_result(result: StepMetrics | None) -> None:
    if result is not None:  # only rank 0 of a torchrun job returns metrics
        print(json.dumps({"step": result.step, "loss": result.loss,
                          **{k: v for k, v in result.evaluation.items() if k in ("val_bpb", "val_bpb_text")}}))


def cmd_train(args: argparse.Namespace) -> int:
    from recurchat.train.spec import init_spec, pretrain_spec, resume_spec
    from recurchat.train.trainer import train

    model, train_fields = overrides(ModelConfig, args), overrides(TrainConfig, args)
    if args.resume and args.init_from:
        raise UserError("--resume continues a run, --init-from starts one from its weights: give one of them")
    if args.resume:
        spec = resume_spec(args.resume, args.out, model=model, train=train_fields)
    elif args.init_from:
        if args.standard:
            raise UserError("--standard builds a new model; --init-from takes the checkpoint's (drop one)")
        spec = init_spec(args.init_from, args.out, model=model, train=train_fields, overwrite=args.overwrite)
    else:
        spec = pretrain_spec(args.preset, args.out, standard=args.standard, model=model, train=train_fields,
                             overwrite=args.overwrite)
    spec.batch_size_given = "batch_size" in train_fields
    print_result(train(spec, progress=not args.quiet))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from recurchat.train.spec import resume_spec, sft_spec
    from recurchat.train.trainer import train

    train_fields = overrides(TrainConfig, args)
    if args.resume:
        spec = resume_spec(args.resume, args.out, train=train_fields)
    elif args.ckpt is None:
        raise UserError("sft needs --ckpt BASE (the pretrained checkpoint) or --resume DIR")
    else:
        spec = sft_spec(args.ckpt, args.out, train=train_fields, overwrite=args.overwrite)
    print_result(train(spec, progress=not args.quiet))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from recurchat.eval.evaluate import EvalRequest, evaluate_checkpoint

    evaluate_checkpoint(EvalRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRequest)}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from recurchat.eval.calibrate import calibrate_checkpoint, calibrate_probe_checkpoint

    if args.probe:
        calibrate_probe_checkpoint(args.ckpt, args.probe, args.criterion, args.max_acc_loss, limit=args.limit,
                                   reference_recur=args.reference_recur, max_recur=args.max_recur,
                                   dtype=args.dtype, device=args.device)
        return 0
    calibrate_checkpoint(args.ckpt, args.criterion, args.max_bpb_loss, eval_tokens=args.eval_tokens,
                         batch_size=args.batch_size, data=args.data, dtype=args.dtype, device=args.device)
    return 0


def lm_eval_main(argv: list[str]) -> int:
    try:
        from recurchat.eval.harness import main
    except ImportError as e:
        raise UserError(f"recurchat lm-eval needs lm-evaluation-harness (pip install lm-eval): {e}") from None
    return main(argv)


def cmd_exit_train(args: argparse.Namespace) -> int:
    from recurchat.train.exit_gate import train_exit_gate

    train_exit_gate(args.ckpt, tau=args.tau, deep_recur=args.deep_recur, train_tokens=args.train_tokens,
                    eval_tokens=args.eval_tokens, steps=args.steps, hidden=args.hidden, data=args.data,
                    dtype=args.dtype, device=args.device, seed=args.seed, probe=args.probe,
                    label=args.label)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from recurchat.cli.generate import cmd_sample as run

    return run(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from recurchat.cli.generate import cmd_chat as run

    return run(args)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from recurchat.data.corpus import embedded_documents, read_documents, split_documents
    from recurchat.data.tokenizer import Tokenizer

    docs = read_documents(args.data) if args.data else embedded_documents()
    train_docs, _ = split_documents(docs)
    tok = Tokenizer.train(train_docs, args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens, fingerprint {tok.fingerprint()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from recurchat.serve.server import serve_main
    from recurchat.serve.settings import ServeConfig

    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}
    serve_main(args.ckpt, ServeConfig(**settings))  # create_app checks it before loading anything
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from recurchat.interop.hf_export import export_hf
    except ImportError as e:
        raise UserError(f"recurchat export hf needs transformers (pip install transformers): {e}") from None
    export_hf(args.ckpt, args.out, push=args.push, card_eval_tokens=args.card_eval_tokens)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from recurchat.interop.importer import import_model

    step = import_model(args.source, args.out, args.seq_len or 0)
    print(f"imported {args.source} → {step}")
    return 0


def cmd_retrofit(args: argparse.Namespace) -> int:
    from recurchat.interop.retrofit import retrofit

    spans = {"prelude": args.prelude, "shared": args.shared, "coda": args.coda}
    step = retrofit(args.ckpt, args.out, spans, args.standard, args.mean_recur, args.r_max, args.seq_len)
    cfg = json.loads((step / "config.json").read_text())["model"]
    print(f"retrofitted {args.ckpt} → {step} (P/R/C = {cfg['n_prelude']}/{cfg['n_shared']}/{cfg['n_coda']}, "
          f"r̄ = {cfg['mean_recur']}); heal it: recurchat train --init-from {args.out} --out HEALED")
    return 0


def cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    """One line per step, newest first: ok (files, MB, seconds), no manifest, or what is damaged."""
    import time
    from pathlib import Path

    from recurchat.checkpoint import NO_MANIFEST, steps_to_verify
    from recurchat.files import manifest_problem
    report = []
    for step in steps_to_verify(args.path):
        started = time.perf_counter()
        problem = manifest_problem(step) if (step / "config.json").is_file() else "incomplete (no config.json)"
        took = time.perf_counter() - started
        size = sum(p.stat().st_size for p in Path(step).rglob("*") if p.is_file())
        status = "ok" if problem is None else ("unverified" if problem == NO_MANIFEST else "DAMAGED")
        print(f"{step}  {status:10}  {size / 1e6:8.1f} MB  {took:5.2f} s  {problem or 'matches its manifest'}")
        report.append(problem)
    return 1 if report[0] not in (None, NO_MANIFEST) else 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    from recurchat.speedrun import speedrun

    speedrun(args.preset, args.out, args.data, dtype=args.dtype, threads=args.threads)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from recurchat.sweep.space import SweepSpec
    from recurchat.sweep.study import sweep

    asked = None
    if args.preset is not None or args.max_steps is not None:
        if args.preset is None or args.max_steps is None:
            raise UserError("sweep: a new study needs both --preset and --max-steps")
        asked = SweepSpec(args.preset, args.max_steps, args.grid, args.search, args.trials,
                          [s for s in args.standard.split(",") if s], args.data or "")
    path = sweep(args.study, asked, args.storage, args.study_name, args.heartbeat, args.grace_period,
                 progress=not args.quiet)
    print(f"[sweep] summary: {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    get_preset(args.preset)
    if args.what == "train":
        from recurchat.bench.train import bench_train

        result = bench_train(args.preset, steps=args.steps, batch_size=args.batch_size, device=args.device,
                             dtype=args.dtype).to_json()
    elif args.what == "infer":
        from recurchat.bench.infer import bench_infer
        from recurchat.checkpoint import AUTO_EXIT, resolve_exit
        from recurchat.infer.exit import ExitCriterion

        sweep = tuple(s for s in args.sweep.split(",") if s)
        if args.exit == AUTO_EXIT and not args.ckpt:
            raise UserError("--exit auto needs --ckpt (a checkpoint calibrated with recurchat calibrate)")
        exit_spec = resolve_exit(args.exit, args.ckpt) if args.ckpt else args.exit
        for spec in (exit_spec, *sweep):
            ExitCriterion.parse(spec)
        result = bench_infer(args.ckpt, args.preset, exit_spec, args.tokens, args.eval_tokens, sweep,
                             dtype=args.dtype, calibrated=args.exit == AUTO_EXIT, speculate=args.speculate,
                             compile=args.compile).to_json()
    elif args.what == "serve":
        from recurchat.bench.serve import MODES, bench_serve

        modes = tuple(m for m in args.batching.split(",") if m)
        if not args.ckpt or not modes or any(m not in MODES for m in modes) or args.rate <= 0:
            raise UserError("bench serve needs --ckpt, --rate > 0 and --batching from static,continuous")
        result = bench_serve(args.ckpt, clients=args.clients, requests=args.requests, rate=args.rate,
                             max_batch=args.max_batch, modes=modes, dtype=args.dtype)
    else:
        raise UserError(f"unknown benchmark {args.what!r} (available: train, infer, serve)")
    if args.json:
        atomic_write_json(args.json, result)
    return 0
