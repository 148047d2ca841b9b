"""Inference benchmark: KV-cached decode vs the naive sampler, fixed depth vs per-token early exit, in one run.

    recurchat bench infer --ckpt runs/tiny [--exit kl:3e-2] [--json bench_infer.json]

Measures: decode tok/s at batch 1 and 8 (fixed r̄ and adaptive) and what they reach of the roofline: the lower of
the FLOP-limited rate at the measured peak of the model's matmuls and the bandwidth-limited rate (the bytes a step
reads, weights once per use plus each row's K/V, at the measured memory bandwidth), the naive recompute sampler at
batch 1 (same continuation length), mean recursions per token, val bpb fixed vs adaptive, KV bytes/token per
strategy, a threshold sweep (compute/quality Pareto curve), and exit_speedup_vs_predicted: the wall-clock speedup of
batched exit over fixed r̄ divided by the speedup its FLOPs predict (its depths, plus the coda+head runs its checks
cost). Without --ckpt a randomly initialised preset model is timed (exit behaviour is then meaningless).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from recurchat.config import get_preset
from recurchat.data.corpus import prepare_data
from recurchat.eval.bpb import evaluate_bpb, evaluate_bpb_exit
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.kv_cache import bytes_per_token
from recurchat.infer.naive import generate_naive
from recurchat.infer.sampling import SamplingParams
from recurchat.infer.speculative import parse_speculate, speculate
from recurchat.model.flops import block_matrix_params, decode_bytes_per_step, flops_per_token
from recurchat.model.hardware import memory_bandwidth, resolve_peak
from recurchat.model.recurrent import RecurrentLM


@dataclass
class DecodeRates:
    """Decode tok/s at batch 1 and 8, at fixed r̄ and under the exit, and the naive sampler's at batch 1."""

    b1: float
    b8: float
    b1_exit: float
    b8_exit: float
    naive_b1: float

    def to_json(self) -> dict:
        return {"decode_tok_s_b1": self.b1, "decode_tok_s_b8": self.b8, "decode_tok_s_b1_exit": self.b1_exit,
                "decode_tok_s_b8_exit": self.b8_exit, "naive_tok_s_b1": self.naive_b1}


@dataclass
class DecodeLimits:
    """The rates decoding cannot beat here: FLOP-limited (every row's matmuls at the measured peak) and
    bandwidth-limited at batch 1 and 8 (a step's bytes at the measured memory bandwidth); the roofline is the lower."""

    flops: float
    bandwidth_b1: float
    bandwidth_b8: float
    bandwidth: float  # bytes/s

    def roofline(self, rows: int) -> float:
        return min(self.flops, self.bandwidth_b1 if rows == 1 else self.bandwidth_b8)

    def to_json(self, rates: DecodeRates) -> dict:
        return {"decode_flop_limit_tok_s": self.flops, "decode_b1_of_flop_limit": rates.b1 / self.flops,
                "decode_b8_of_flop_limit": rates.b8 / self.flops, "memory_bandwidth_bytes_s": self.bandwidth,
                "decode_bandwidth_limit_tok_s_b1": self.bandwidth_b1,
                "decode_bandwidth_limit_tok_s_b8": self.bandwidth_b8,
                "decode_b1_of_roofline": rates.b1 / self.roofline(1),
                "decode_b8_of_roofline": rates.b8 / self.roofline(8)}


@dataclass
class Speculation:
    """Self-speculative decoding (`spec` = DRAFT_R:K) against fixed r̄ on the same prompts."""

    spec: str
    speedup_b1: float
    speedup_b8: float
    acceptance: float
    sampling_speedup_b1: float  # temperature 0.8, speculative sampling
    sampling_acceptance: float
    greedy_identical: bool
    first_difference: int | None  # the first token where greedy output differs (bf16 near-ties), else None
    tokens_per_round_b1: float  # greedy, batch 1: tokens emitted per verification forward (at most K + 1)
    # speedup_b1 had every draft been kept: × (K + 1) ÷ tokens_per_round_b1, at this run's round cost (None: no token
    # came from a round)
    ceiling_b1: float | None

    def to_json(self) -> dict:
        return {"speculate": self.spec, **{f"speculative_{f.name}": getattr(self, f.name)
                                           for f in dataclasses.fields(self) if f.name != "spec"}}


@dataclass
class InferBench:
    """`recurchat bench infer`'s figures; `to_json()` is its --json file (flat keys, as docs/benchmarks.md lists)."""

    device: str
    dtype: str
    exit: str
    fixed_recursions: int
    decode: DecodeRates
    exit_mean_recursions: float  # per decoded token at batch 8
    exit_speedup_b8: float  # wall clock, fixed r̄ ÷ exit, batch 8
    exit_speedup_predicted: float  # what the exit's FLOPs predict at batch 8
    bpb_fixed: float
    bpb_exit: float
    exit_eval_mean_recursions: float  # per held-out token while scoring bpb
    limits: DecodeLimits
    kv_bytes_per_token: dict[str, int]
    pareto: list[dict]
    speculation: Speculation | None = None
    calibrated: bool = False  # `exit` is the checkpoint's calibrated exit: the exit_calibrated_* keys repeat it
    compiled: bool = False  # fixed-depth decode steps ran compiled (--compile)

    def to_json(self) -> dict:
        d, exit_b1 = self.decode, self.decode.b1_exit / self.decode.b1
        bpb_delta = self.bpb_exit / self.bpb_fixed - 1
        calibrated = {"exit_calibrated_speedup_b1": exit_b1, "exit_calibrated_speedup_b8": self.exit_speedup_b8,
                      "exit_calibrated_bpb_delta": bpb_delta}
        return {**d.to_json(), "device": self.device, "dtype": self.dtype, "exit": self.exit,
                "exit_mean_recursions": self.exit_mean_recursions, "fixed_recursions": self.fixed_recursions,
                "exit_bpb_delta": bpb_delta, "bpb_fixed": self.bpb_fixed, "bpb_exit": self.bpb_exit,
                "exit_eval_mean_recursions": self.exit_eval_mean_recursions,
                "exit_speedup_measured": self.exit_speedup_b8, "exit_speedup_predicted": self.exit_speedup_predicted,
                "exit_speedup_vs_predicted": self.exit_speedup_b8 / self.exit_speedup_predicted,
                "exit_speedup_b1": exit_b1, "exit_speedup_b8": self.exit_speedup_b8,
                **(calibrated if self.calibrated else {}), "cached_over_naive_b1": d.b1 / d.naive_b1,
                **(self.speculation.to_json() if self.speculation else {}),
                "kv_bytes_per_token": self.kv_bytes_per_token, "pareto": self.pareto, "compiled": self.compiled,
                **self.limits.to_json(d)}


def head_flops(cfg) -> float:
    """Forward FLOPs per token of one coda + lm_head pass (what a logit-based exit check costs)."""
    return 2 * (cfg.n_coda * block_matrix_params(cfg) + cfg.d_model * cfg.vocab_size)


def decode_limits(engine: Engine, rates: DecodeRates, mean_context: int, log) -> DecodeLimits:
    """The decode rates the model's FLOPs (at the measured peak of its matmuls) and its bytes (at the measured memory
    bandwidth) allow at fixed r̄ over the mean context, logged with what batch 1 and 8 reach of them: the headline of
    "close to the limit". Weights are read in the compute dtype (bf16 autocast keeps a bf16 copy of each)."""
    cfg, size = engine.cfg, engine.dtype.torch_dtype.itemsize
    peak = resolve_peak(engine.device, engine.dtype, cfg, rows=cfg.seq_len).flops
    bandwidth = memory_bandwidth(engine.device)
    flops = peak / flops_per_token(cfg, cfg.mean_recur, backward=False, seq_len=mean_context)
    by_rows = [rows * bandwidth / decode_bytes_per_step(cfg, rows, mean_context, size, size) for rows in (1, 8)]
    limits = DecodeLimits(flops, *by_rows, bandwidth)
    log(f"  FLOP-limited decode at the measured peak ({peak / 1e9:,.0f} GFLOP/s): {flops:,.0f} tok/s; batch 1 "
        f"reaches {100 * rates.b1 / flops:.1f}%, batch 8 {100 * rates.b8 / flops:.1f}%")
    log(f"  bandwidth-limited decode at the measured {bandwidth / 1e9:.1f} GB/s: batch 1 {by_rows[0]:,.0f} tok/s, "
        f"batch 8 {by_rows[1]:,.0f} tok/s; of the roofline (the lower limit) batch 1 reaches "
        f"{100 * rates.b1 / limits.roofline(1):.1f}%, batch 8 {100 * rates.b8 / limits.roofline(8):.1f}%")
    return limits


def timed_generate(engine: Engine, prompts, tokens: int, recur: RecurParams, repeats: int = 3):
    sp = SamplingParams(max_tokens=tokens, temperature=0.0)
    times, gens = [], None
    for _ in range(repeats):
        engine.runner.iterations = engine.runner.extra_heads = 0
        t0 = time.perf_counter()
        gens = engine.generate(prompts, sp, recur)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), gens, engine.runner.extra_heads


def quality(engine: Engine, val, token_bytes: torch.Tensor, eval_tokens: int, adaptive: RecurParams,
            sweep: tuple[str, ...], log) -> tuple[float, float, float, list[dict]]:
    """(bpb at fixed r̄, bpb under `adaptive`, its recursions/token, the Pareto points of `sweep` and fixed depths)."""
    model, cfg = engine.model, engine.cfg
    rbar, bs = cfg.mean_recur, min(8, max(1, eval_tokens // cfg.seq_len))
    bpb_fixed = evaluate_bpb(model, val, token_bytes, bs, cfg.seq_len, eval_tokens, num_recur=rbar,
                             dtype=engine.dtype)
    bpb_exit, mean_exit = evaluate_bpb_exit(engine, val, token_bytes, bs, cfg.seq_len, eval_tokens, adaptive)
    log(f"  val bpb fixed r̄ {bpb_fixed:.4f}; {adaptive.exit}: {bpb_exit:.4f} at {mean_exit:.2f} recursions/token "
        f"(Δ {100 * (bpb_exit / bpb_fixed - 1):+.2f}%)")
    pareto = []
    for spec in sweep:
        b, r = evaluate_bpb_exit(engine, val, token_bytes, bs, cfg.seq_len, eval_tokens,
                                 RecurParams(exit=spec, max_recur=adaptive.max_recur))
        pareto.append({"exit": spec, "mean_recursions": r, "bpb": b, "bpb_delta": b / bpb_fixed - 1})
        log(f"  sweep {spec:<14} recursions {r:5.2f}  bpb {b:.4f} (Δ {100 * (b / bpb_fixed - 1):+.2f}%)")
    for r in sorted({1, max(1, rbar // 2), rbar, 2 * rbar}):
        b = evaluate_bpb(model, val, token_bytes, bs, cfg.seq_len, eval_tokens, num_recur=r, dtype=engine.dtype)
        pareto.append({"exit": f"fixed:{r}", "mean_recursions": r, "bpb": b, "bpb_delta": b / bpb_fixed - 1})
        log(f"  sweep {'fixed:' + str(r):<14} recursions {r:5.2f}  bpb {b:.4f} (Δ {100 * (b / bpb_fixed - 1):+.2f}%)")
    return bpb_fixed, bpb_exit, mean_exit, pareto


def timed_speculation(engine: Engine, prompts, sampling: SamplingParams, spec: str, repeats: int = 3):
    draft_r, k = parse_speculate(spec)
    times, out = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = speculate(engine, prompts, sampling, engine.cfg.mean_recur, draft_r, k)
        times.append(time.perf_counter() - t0)
    return sum(len(s.tokens) for s in out) / statistics.median(times), out


def speculative(engine: Engine, prompts8, tokens: int, spec: str, fixed_tok_s: tuple[float, float],
                fixed_greedy: list[list[int]], log) -> Speculation:
    """Self-speculative decoding (`spec` = DRAFT_R:K) against fixed-r̄ decoding of the same prompts: greedy at
    batch 1 and 8, and sampling (temperature 0.8, speculative sampling) at batch 1."""
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0)
    tok_s1, s1 = timed_speculation(engine, prompts8[:1], greedy, spec)
    tok_s8, s8 = timed_speculation(engine, prompts8, greedy, spec)
    sampled = SamplingParams(max_tokens=tokens, temperature=0.8, seed=0)
    t0 = time.perf_counter()
    engine.generate(prompts8[:1], sampled, RecurParams(num_recur=engine.cfg.mean_recur))
    fixed_sampled_tok_s = tokens / (time.perf_counter() - t0)
    tok_ss, ss = timed_speculation(engine, prompts8[:1], sampled, spec)  # median of 3: a first call may compile
    got = [s.tokens for s in s8]
    identical = got == fixed_greedy and s1[0].tokens == fixed_greedy[0]
    # identical by construction in exact arithmetic; in bf16 a near-tie can round the other way in the chunked
    # verification (fp32: identical, tests/infer/test_speculative.py), so the first difference is reported too
    differ = next((i for i, (a, b) in enumerate(zip(s1[0].tokens, fixed_greedy[0])) if a != b), None)
    per_round, k = s1[0].tokens_per_round, parse_speculate(spec)[1]
    ceiling = tok_s1 / fixed_tok_s[0] * (k + 1) / per_round if per_round else None
    out = Speculation(spec, tok_s1 / fixed_tok_s[0], tok_s8 / fixed_tok_s[1], s1[0].acceptance,
                      tok_ss / fixed_sampled_tok_s, ss[0].acceptance, identical, differ, per_round, ceiling)
    log(f"  speculative {spec}: greedy {out.speedup_b1:.2f}× fixed r̄ at batch 1 (acceptance "
        f"{100 * s1[0].acceptance:.0f}%, {per_round:.2f} tokens a round"
        + (f"; every draft kept: at most {ceiling:.2f}×" if ceiling is not None else "")
        + f"), {out.speedup_b8:.2f}× at batch 8; sampling at T=0.8 "
        f"{out.sampling_speedup_b1:.2f}× at batch 1 (acceptance {100 * ss[0].acceptance:.0f}%); "
        f"greedy identical to fixed-r̄ greedy: {identical}"
        + (f" (first difference at token {differ}, {engine.dtype.name})" if differ is not None else ""))
    return out


def bench_infer(ckpt: str | None = None, preset: str = "cpu-tiny", exit_spec: str = "kl:3e-2", tokens: int = 256,
                eval_tokens: int = 2048, sweep: tuple[str, ...] = (), log=print, dtype: str = "auto",
                calibrated: bool = False, speculate: str = "1:6", compile: bool = False) -> InferBench:
    """`calibrated`: `exit_spec` is the checkpoint's calibrated exit (`--exit auto`); the JSON then also carries
    its figures under exit_calibrated_* keys."""
    from recurchat.checkpoint import load_exit_gate, load_model  # the loading path every command uses

    gate = None
    if ckpt:
        ck, model = load_model(ckpt)
        gate = load_exit_gate(ck.path)
        tokenizer, data_path = ck.tokenizer, ck.train_cfg.data or None
    else:
        torch.manual_seed(0)
        model = RecurrentLM(get_preset(preset).model).eval()
        tokenizer, data_path = None, None
    cfg = model.cfg
    data = prepare_data(data_path, cfg.vocab_size, tokenizer=tokenizer, log=lambda *a, **k: None)
    # a compiled engine picks its `auto` dtype for batch 1: the headline rate, and what sample and chat decode
    engine = Engine(model, dtype=dtype, exit_gate=gate, compile=compile, decode_rows=1)
    log(engine.describe())
    rbar, rmax = cfg.mean_recur, cfg.r_max
    val = data.val
    prompt_len = 16
    starts = [i * (len(val) - prompt_len) // 8 for i in range(8)]  # eight different held-out passages
    prompts8 = [val[s:s + prompt_len].astype("int64").tolist() for s in starts]
    tokens = min(tokens, cfg.seq_len - prompt_len - 1)
    fixed = RecurParams(num_recur=rbar)
    adaptive = RecurParams(exit=exit_spec, max_recur=rmax)
    log(f"bench infer: {'checkpoint ' + ckpt if ckpt else 'random ' + preset}, r̄={rbar}, r_max={rmax}, "
        f"{tokens}-token continuations, exit {exit_spec}" + (", fixed-depth steps compiled" if compile else ""))

    t_naive = []
    for _ in range(2):
        t0 = time.perf_counter()
        with engine.dtype.autocast(engine.device):  # the naive baseline runs in the engine's dtype too
            generate_naive(model, prompts8[0], tokens, num_recur=rbar, temperature=0.0)
        t_naive.append(time.perf_counter() - t0)
    naive_tok_s = tokens / statistics.median(t_naive)
    t1, _, _ = timed_generate(engine, prompts8[:1], tokens, fixed)
    t8, g8_fixed, _ = timed_generate(engine, prompts8, tokens, fixed)
    t1x, g1x, _ = timed_generate(engine, prompts8[:1], tokens, adaptive)
    t8x, g8x, heads8 = timed_generate(engine, prompts8, tokens, adaptive)
    n8 = sum(len(g.tokens) for g in g8x)
    depths8 = [d for g in g8x for d in g.depths[1:]]  # the first token's depth is the prefill's
    mean_rec = sum(depths8) / len(depths8)
    f_fixed = sum(flops_per_token(cfg, rbar, backward=False) for g in g8_fixed for _ in g.depths[1:])
    f_exit = sum(flops_per_token(cfg, d, backward=False) for d in depths8) + heads8 * head_flops(cfg)
    predicted = f_fixed / f_exit
    measured = t8 / t8x
    rates = DecodeRates(tokens / t1, 8 * tokens / t8, len(g1x[0].tokens) / t1x, n8 / t8x, naive_tok_s)
    for k, v in rates.to_json().items():
        log(f"  {k:<24} {v:9.1f} tok/s")
    log(f"  cached/naive at batch 1: {rates.b1 / naive_tok_s:.1f}×")
    limits = decode_limits(engine, rates, prompt_len + tokens // 2, log)
    spec = speculative(engine, prompts8, tokens, speculate, (rates.b1, rates.b8),
                       [g.tokens for g in g8_fixed], log) if cfg.recursive else None
    log(f"  exit at batch 8: mean recursions {mean_rec:.2f} (fixed {rbar}); wall-clock speedup {measured:.2f}× vs "
        f"FLOPs-predicted {predicted:.2f}× → ratio {measured / predicted:.2f}")

    bpb_fixed, bpb_exit, mean_exit, pareto = quality(engine, val, data.tokenizer.token_bytes(), eval_tokens,
                                                     adaptive, sweep, log)
    kv = {s: bytes_per_token(cfg, s, rbar, engine.dtype.torch_dtype) for s in ("full", "last", "ring:2")}
    log(f"  KV bytes/token at r̄ ({engine.dtype.name}): " + ", ".join(f"{k} {v}" for k, v in kv.items()))
    return InferBench(str(engine.device.type), engine.dtype.name, exit_spec, rbar, rates, mean_rec, measured,
                      predicted, bpb_fixed, bpb_exit, mean_exit, limits, kv, pareto, spec, calibrated, compile)
