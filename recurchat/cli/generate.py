"""`recurchat sample` and `recurchat chat`: text generation through the KV-cached engine from the command line.

    recurchat sample --ckpt runs/tiny -p "In the beginning" --exit kl:3e-2
    recurchat chat --ckpt runs/tiny-sft            # interactive; -p "..." for one shot

Exercised by `pytest tests/infer/test_infer_cli.py`.
"""

from __future__ import annotations

import argparse
import sys

from recurchat.checkpoint import load_model, resolve_exit
from recurchat.config import ModelConfig
from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurError, RecurParams
from recurchat.infer.sampling import SamplingParams


def recur_params(args: argparse.Namespace, cfg: ModelConfig) -> RecurParams:
    try:
        return RecurParams(num_recur=args.recur, exit=resolve_exit(args.exit, args.ckpt), max_recur=args.max_recur,
                           kv=args.kv, warm_start=args.warm_start).validate(cfg)
    except RecurError as e:
        flag = {"num_recur": "--recur", "max_recur": "--max-recur"}.get(e.param, f"--{e.param}")
        raise UserError(f"{flag}: {e}") from None


def sampling_params(args: argparse.Namespace, stop_ids: tuple[int, ...], seed: int):
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=seed, stop_ids=stop_ids)


def cmd_sample(args: argparse.Namespace) -> int:
    if args.speculate:
        return sample_speculative(args)
    ckpt, model = load_model(args.ckpt, args.device)
    tok = ckpt.tokenizer
    prompt = [tok.bos_id] + tok.encode(args.prompt)
    engine = Engine.for_checkpoint(ckpt, model, args.dtype, args.compile, decode_rows=args.num_samples)
    prompts = [prompt] * args.num_samples
    recur = recur_params(args, model.cfg)
    engine.check(prompts, recur)
    print(engine.describe(), file=sys.stderr)
    # one seed per sample (seed, seed + 1, ...): each row draws from its own generator
    gens = engine.generate(prompts, [sampling_params(args, (tok.bos_id,), args.seed + i) for i in range(len(prompts))],
                           recur)
    for g in gens:
        print(args.prompt + tok.decode(g.tokens))
        print(f"[{len(g.tokens)} tokens, mean recursion depth {g.mean_depth:.2f}]", file=sys.stderr)
    return 0


def sample_speculative(args: argparse.Namespace) -> int:
    from recurchat.infer.speculative import parse_speculate, speculate

    draft_r, k = parse_speculate(args.speculate)
    if args.exit:
        raise UserError("--speculate decodes at a fixed depth (--recur, default r̄): drop --exit")
    ckpt, model = load_model(args.ckpt, args.device)
    tok = ckpt.tokenizer
    engine = Engine(model, dtype=args.dtype, compile=args.compile, decode_rows=args.num_samples)
    print(engine.describe(), file=sys.stderr)
    target = args.recur or model.cfg.mean_recur
    prompt = [tok.bos_id] + tok.encode(args.prompt)
    specs = speculate(engine, [prompt] * args.num_samples,
                      [sampling_params(args, (tok.bos_id,), args.seed + i) for i in range(args.num_samples)], target,
                      draft_r, k)
    for spec in specs:
        print(args.prompt + tok.decode(spec.tokens))
        print(f"[{len(spec.tokens)} tokens at depth {target}; {spec.accepted}/{spec.drafted} drafted at depth "
              f"{draft_r} accepted ({100 * spec.acceptance:.0f}%) in {spec.rounds} verification passes]",
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from recurchat.data.chat import render_prompt
    ckpt, model = load_model(args.ckpt, args.device)
    tok = ckpt.tokenizer
    engine = Engine.for_checkpoint(ckpt, model, args.dtype, args.compile, decode_rows=1)
    recur = recur_params(args, model.cfg)
    engine.check([[tok.bos_id]], recur)
    print(engine.describe(), file=sys.stderr)
    stop = tok.special_ids()  # any special token ends the reply, so none is printed
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str, turn: int) -> None:
        messages.append({"role": "user", "content": text})
        ids = render_prompt(tok, messages)
        if len(ids) >= model.cfg.seq_len:
            raise UserError(f"the conversation is {len(ids)} tokens; the context is {model.cfg.seq_len}")
        out, depths = [], []
        printed = ""
        for events in engine.stream([ids], sampling_params(args, stop, args.seed + turn), recur):
            ev = events[0]
            if ev.finish_reason == "stop":
                break
            out.append(ev.token)
            depths.append(ev.depth)
            text_so_far = tok.decode(out)
            print(text_so_far[len(printed):], end="", flush=True)
            printed = text_so_far
        print()
        mean = sum(depths) / len(depths) if depths else 0.0
        print(f"[{len(out)} tokens, mean recursion depth {mean:.2f}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": printed})

    if args.prompt is not None:
        reply(args.prompt, 0)
        return 0
    print("recurchat chat — empty line or Ctrl-D to quit", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        print("bot> ", end="", flush=True)
        reply(line, turn)
        turn += 1
    return 0
