"""Training benchmark: recursive vs its unrolled standard twin, eager vs compiled, in one process, side by side.

    recurchat bench train [--preset cpu-tiny] [--steps 8] [--json bench.json]

Cases (in the dtype `--dtype` resolves to, auto by default; a full optimizer step each, random tokens so data
loading is not measured): recursive at fixed r = r̄, eager and compiled, with the share of the step spent in the
optimizer; the standard twin (P + r̄·R + C blocks), eager and compiled; recursive with Poisson log-normal r
(compiled), counting graphs compiled after warm-up; truncated (k = r̄) vs full BPTT at r = 4·r̄: peak memory
(CUDA: max_memory_allocated; CPU: bytes of tensors saved for backward, the part BPTT truncation changes).
MFU is against the measured peak of the model's own matmuls (model/hardware.py), and the JSON says which dtype
was chosen and how fast bf16 matmuls run here relative to fp32.
Medians over the timed steps; the machine may be noisy, so compare ratios, not absolute times.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo

from recurchat.config import ModelConfig, TrainConfig, get_preset
from recurchat.model import hardware
from recurchat.model.depth import DepthSampler
from recurchat.model.flops import flops_per_token
from recurchat.model.hardware import DtypeChoice
from recurchat.model.recurrent import RecurrentLM
from recurchat.train.optim import build_optimizers


def graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class Runner:
    """One model + optimizers; `step(r, k)` is a full training step on a fixed random batch."""

    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig, batch_size: int, device: torch.device, compiled: bool,
                 dtype: DtypeChoice):
        torch.manual_seed(0)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.model = RecurrentLM(cfg).to(device)
        if compiled:
            self.model.compile_stages()
        self.optimizers = build_optimizers(self.model, tcfg, dtype.torch_dtype)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g).to(device)
        self.y = torch.roll(self.x, -1, dims=1)
        self.optimizer_s: list[float] = []  # time in the optimizers, per step

    def step(self, r: int | None, k: int | None) -> float:
        hardware.sync(self.device)
        t0 = time.perf_counter()
        with self.dtype.autocast(self.device):
            loss = self.model(self.x, self.y, num_recur=r, bptt_k=k)
        loss.backward()
        hardware.sync(self.device)
        t_opt = time.perf_counter()
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        hardware.sync(self.device)
        t1 = time.perf_counter()
        self.optimizer_s.append(t1 - t_opt)
        return t1 - t0

    def timed(self, r: int | None, k: int | None, warmup: int, steps: int) -> tuple[float, float]:
        """(median step seconds, median share of a step spent in the optimizers) over `steps` timed steps."""
        for _ in range(warmup):
            self.step(r, k)
        self.optimizer_s.clear()
        times = [self.step(r, k) for _ in range(steps)]
        return statistics.median(times), statistics.median(o / t for o, t in zip(self.optimizer_s, times))


def saved_activation_bytes(model: RecurrentLM, x: torch.Tensor, y: torch.Tensor, r: int, k: int,
                           device: torch.device, dtype: DtypeChoice) -> int:
    """Peak memory of one training step: CUDA allocator peak, or on CPU the bytes autograd keeps for backward."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with dtype.autocast(device):
            model(x, y, num_recur=r, bptt_k=k).backward()
        model.zero_grad(set_to_none=True)
        return int(torch.cuda.max_memory_allocated(device))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), dtype.autocast(device):
        loss = model(x, y, num_recur=r, bptt_k=k)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


@dataclass
class Setup:
    """What every case of one benchmark shares."""

    cfg: ModelConfig
    tcfg: TrainConfig
    batch_size: int
    device: torch.device
    dtype: DtypeChoice
    peak: hardware.Peak
    log: Callable[[str], None]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.cfg.seq_len


def timed_case(su: Setup, name: str, model_cfg: ModelConfig, compiled: bool, r: int | None, k: int | None,
               steps: int, warmup: int) -> dict:
    """Median step time, throughput, MFU and optimizer share of one model at one fixed r."""
    runner = Runner(model_cfg, su.tcfg, su.batch_size, su.device, compiled, su.dtype)
    t0 = time.perf_counter()
    runner.step(r, k)  # the first step pays for compilation
    first = time.perf_counter() - t0
    t, opt_share = runner.timed(r, k, warmup - 1, steps)
    fpt = flops_per_token(model_cfg, r, k)
    row = {"case": name, "step_s": t, "first_step_s": first, "tok_s": su.tokens / t, "flops_per_token": fpt,
           "flops_s": fpt * su.tokens / t, "mfu": fpt * su.tokens / t / su.peak.flops,
           "optimizer_step_fraction": opt_share, "params": runner.model.num_params()["total"]}
    su.log(f"  {name:<34} {t * 1e3:8.1f} ms/step  {row['tok_s']:8.0f} tok/s  {row['flops_s'] / 1e9:7.1f} GFLOP/s  "
           f"MFU {100 * row['mfu']:5.1f}%  optimizer {100 * opt_share:4.1f}%  (first step {first:.1f} s)")
    return row


def sampled_case(su: Setup, sampled_steps: int) -> dict:
    """Compiled, Poisson log-normal r: graphs compiled after warm-up while >= 8 distinct r go by, and MFU."""
    cfg, k = su.cfg, su.tcfg.bptt_k
    runner = Runner(cfg, su.tcfg, su.batch_size, su.device, True, su.dtype)
    runner.step(1, k)  # the two graph kinds: a no-grad iteration exists only when r > k
    runner.step(cfg.r_max, k)
    before = graphs_compiled()
    sampler = DepthSampler("poisson-lognormal", cfg.mean_recur, cfg.r_max, su.tcfg.recur_sigma, seed=0)
    seen_r, times, flops = [], [], 0.0
    step = 0
    while (step < sampled_steps or len(set(seen_r)) < 8) and step <= 4 * sampled_steps + cfg.r_max:
        r = sampler.sample(step)[0] if step < sampled_steps else 1 + step % cfg.r_max
        times.append(runner.step(r, k))
        seen_r.append(r)
        flops += flops_per_token(cfg, r, k) * su.tokens
        step += 1
    recompiles = graphs_compiled() - before
    row = {"case": "recursive sampled r compiled", "distinct_r": len(set(seen_r)), "recompiles": recompiles,
           "flops_s": flops / sum(times), "mfu": flops / sum(times) / su.peak.flops}
    su.log(f"  {row['case']:<34} {row['distinct_r']} distinct r, {recompiles} graphs compiled after warm-up, "
           f"{row['flops_s'] / 1e9:.1f} GFLOP/s, MFU {100 * row['mfu']:.1f}%")
    return row


def bptt_memory(su: Setup) -> dict:
    """Truncated (k = r̄) vs full BPTT memory at r = 4·r̄."""
    rbar = su.cfg.mean_recur
    r_deep = 4 * rbar
    model = RecurrentLM(su.cfg).to(su.device)
    x = torch.randint(0, su.cfg.vocab_size, (su.batch_size, su.cfg.seq_len), device=su.device)
    truncated = saved_activation_bytes(model, x, x, r_deep, rbar, su.device, su.dtype)
    full = saved_activation_bytes(model, x, x, r_deep, r_deep, su.device, su.dtype)
    su.log(f"  BPTT memory at r={r_deep}: truncated k={rbar} {truncated / 2**20:.1f} MiB, full {full / 2**20:.1f} MiB"
           f" → ratio {truncated / full:.3f}"
           + (" (CPU: activations saved for backward)" if su.device.type == "cpu" else ""))
    return {"truncated": truncated, "full": full, "r": r_deep, "k": rbar}


@dataclass
class TrainBench:
    """`recurchat bench train`'s figures; `to_json()` is its --json file. FLOP/s ratios are recursive ÷ its unrolled
    twin; MFU against `peak_flops`; `cases` holds every timed case's own numbers."""

    device: str
    machine: dict
    preset: str
    batch_size: int
    seq_len: int
    dtype_chosen: str
    bf16_over_fp32_matmul: float
    peak_flops: float
    peak_flops_source: str
    optimizer_step_fraction: float  # of the step the training loop runs here (compiled on CUDA, eager on CPU)
    recursive_vs_unrolled_flops_ratio: float
    recursive_vs_unrolled_flops_ratio_eager: float
    compiled_vs_eager_speedup: float
    mfu_recursive_eager: float
    mfu_recursive_compiled: float
    mfu_standard_compiled: float
    mfu_recursive_sampled_compiled: float
    recompiles_after_warmup: int
    distinct_r_after_warmup: int
    bptt_memory_ratio: float  # truncated ÷ full BPTT at r = 4·r̄
    bptt_memory_bytes: dict
    params: dict[str, int]
    cases: list[dict]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def bench_train(preset: str = "cpu-tiny", steps: int = 8, warmup: int = 3, batch_size: int = 8,
                device: str = "auto", sampled_steps: int = 16, log=print, dtype: str = "auto") -> TrainBench:
    dev = hardware.resolve_device(device)
    p = get_preset(preset)
    cfg, tcfg = p.model, p.train
    choice = hardware.choose_dtype(dtype, dev)
    peak = hardware.resolve_peak(dev, choice, cfg, batch_size * cfg.seq_len)
    su = Setup(cfg, tcfg, batch_size, dev, choice, peak, log)
    rbar, k = cfg.mean_recur, tcfg.bptt_k
    log(f"bench train: preset {preset}, batch {batch_size}×{cfg.seq_len}, r̄={rbar}, k={k}")
    log(hardware.banner(dev, choice, peak))

    torch._dynamo.reset()
    twin = cfg.standard_twin()
    rec_eager = timed_case(su, "recursive r=r̄ eager", cfg, False, rbar, k, steps, warmup)
    std_eager = timed_case(su, "standard twin eager", twin, False, None, None, steps, warmup)
    rec_comp = timed_case(su, "recursive r=r̄ compiled", cfg, True, rbar, k, steps, warmup)
    std_comp = timed_case(su, "standard twin compiled", twin, True, None, None, steps, warmup)
    sampled = sampled_case(su, sampled_steps)
    memory = bptt_memory(su)
    # The training loop's own setting: compiled on CUDA, eager on CPU (trainer.py's default).
    trained = rec_comp if dev.type == "cuda" else rec_eager
    result = TrainBench(
        dev.type, hardware.run_record(dev, choice, peak), preset, batch_size, cfg.seq_len, choice.name,
        hardware.bf16_over_fp32_matmul(dev), peak.flops, peak.source, trained["optimizer_step_fraction"],
        rec_comp["flops_s"] / std_comp["flops_s"], rec_eager["flops_s"] / std_eager["flops_s"],
        rec_eager["step_s"] / rec_comp["step_s"], rec_eager["mfu"], rec_comp["mfu"], std_comp["mfu"], sampled["mfu"],
        sampled["recompiles"], sampled["distinct_r"], memory["truncated"] / memory["full"], memory,
        {"recursive": rec_eager["params"], "standard": std_eager["params"]},
        [rec_eager, std_eager, rec_comp, std_comp, sampled])
    log(f"dtype {choice.name} (bf16 matmul {result.bf16_over_fp32_matmul:.2f}× fp32 here); optimizer share of an "
        f"{'compiled' if dev.type == 'cuda' else 'eager'} step {100 * result.optimizer_step_fraction:.1f}%; "
        f"recursive/unrolled FLOP/s (compiled) {result.recursive_vs_unrolled_flops_ratio:.3f}, "
        f"compiled/eager speedup {result.compiled_vs_eager_speedup:.2f}×, MFU recursive compiled "
        f"{100 * result.mfu_recursive_compiled:.1f}%, recompiles after warm-up {sampled['recompiles']}, "
        f"BPTT memory ratio {result.bptt_memory_ratio:.3f}")
    return result
