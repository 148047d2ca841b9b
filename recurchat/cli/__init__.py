"""The front door: `recurchat <command>` (same as `python -m recurchat <command>`). Thin: parse, call one function.

    recurchat train --preset cpu-tiny --out runs/tiny --max-steps 200
    recurchat sft --ckpt runs/tiny --data builtin:hops,arith --out runs/tiny-sft
    recurchat eval --ckpt runs/tiny --tasks bpb --recur 1,2,4,8 --json bpb.json
    recurchat sample --ckpt runs/tiny -p "In the beginning"
    recurchat chat --ckpt runs/tiny --exit kl:1e-3 -p "Hello"
    recurchat tokenizer train --data corpus.txt --vocab-size 4096 --out tok.json
    recurchat serve --ckpt runs/tiny-sft --port 8000
    recurchat bench train --json bench.json

A UserError (bad input) prints one line `error: ...` and exits 2; nothing is overwritten. The commands live in
cli/commands.py, their flags in cli/parsers.py.
"""

from __future__ import annotations

import argparse
import sys

from recurchat.cli.commands import overrides
from recurchat.cli.parsers import (
    add_calibrate_parser,
    add_driver_parsers,
    add_eval_parser,
    add_exit_train_parser,
    add_generation_parsers,
    add_serve_parser,
    add_sft_parser,
    add_train_parser,
)
from recurchat.config import PRESETS
from recurchat.errors import UserError

__all__ = ["build_parser", "main", "overrides"]  # `overrides`: tests build configs the way the commands do


def chosen_preset(argv: list[str] | None) -> str:
    """The --preset on the command line (so `train --preset X --help` shows X's values), else cpu-tiny."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset", default="cpu-tiny")
    name = peek.parse_known_args(sys.argv[1:] if argv is None else argv)[0].preset
    return name if name in PRESETS else "cpu-tiny"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recurchat", description="Recursive language models with adaptive compute.")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub, chosen_preset(argv))
    add_sft_parser(sub)
    add_eval_parser(sub)
    add_calibrate_parser(sub)
    add_exit_train_parser(sub)
    add_generation_parsers(sub)
    add_serve_parser(sub)
    add_driver_parsers(sub)
    sub.add_parser("lm-eval", help="lm-evaluation-harness's command line with the recurchat model registered: "
                                   "recurchat lm-eval --model recurchat --model_args ckpt=DIR,recur=8 --tasks T")
    return p


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    try:
        if given[:1] == ["lm-eval"]:  # lm_eval's own flags, passed through untouched
            from recurchat.cli.commands import lm_eval_main

            return lm_eval_main(given[1:])
        args = build_parser(argv).parse_args(argv)
        if getattr(args, "threads", 0):
            from recurchat.model.hardware import set_threads

            set_threads(args.threads)
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
