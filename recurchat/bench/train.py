"""Training benchmark: recursive vs its unrolled standard twin, eager vs compiled, in one process, side by side.

    recurchat bench train [--preset cpu-tiny] [--steps 8] [--json bench.json]

Cases (bf16 autocast, a full optimizer step each, random tokens so data loading is not measured):
  recursive at fixed r = r̄, eager and compiled; the standard twin (P + r̄·R + C blocks), eager and compiled;
  recursive with Poisson log-normal r (compiled), counting graphs compiled after warm-up; truncated (k = r̄) vs
  full BPTT at r = 4·r̄: peak memory (CUDA: max_memory_allocated; CPU: bytes of tensors saved for backward, the
  part BPTT truncation changes); a bf16 and fp32 matmul peak on the same device as the MFU denominator.
Medians over the timed steps; the machine may be noisy, so compare ratios, not absolute times.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch._dynamo

from recurchat.config import ModelConfig, TrainConfig, get_preset
from recurchat.model.depth import DepthSampler
from recurchat.model.flops import flops_per_token
from recurchat.model.recurrent import RecurrentLM
from recurchat.train.optim import build_optimizers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps dense square matmul FLOP/s: the ceiling MFU is measured against on this very machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 3 if device.type == "cpu" else 50
    a @ b
    best = 0.0
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * inner / (time.perf_counter() - t0))
    return best


def graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class Runner:
    """One model + optimizers; `step(r, k)` is a full training step on a fixed random batch."""

    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig, batch_size: int, device: torch.device, compiled: bool):
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = RecurrentLM(cfg).to(device)
        if compiled:
            self.model.compile_stages()
        self.optimizers = build_optimizers(self.model, tcfg)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g).to(device)
        self.y = torch.roll(self.x, -1, dims=1)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(self, r: int | None, k: int | None) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with self.autocast:
            loss = self.model(self.x, self.y, num_recur=r, bptt_k=k)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0

    def timed(self, r: int | None, k: int | None, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.step(r, k)
        return statistics.median(self.step(r, k) for _ in range(steps))


def saved_activation_bytes(model: RecurrentLM, x: torch.Tensor, y: torch.Tensor, r: int, k: int,
                           device: torch.device) -> int:
    """Peak memory of one training step: CUDA allocator peak, or on CPU the bytes autograd keeps for backward."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, y, num_recur=r, bptt_k=k).backward()
        model.zero_grad(set_to_none=True)
        return int(torch.cuda.max_memory_allocated(device))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y, num_recur=r, bptt_k=k)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def bench_train(preset: str = "cpu-tiny", steps: int = 8, warmup: int = 3, batch_size: int = 8,
                device: str = "auto", sampled_steps: int = 16, log=print) -> dict:
    dev = torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if device == "auto" else device))
    p = get_preset(preset)
    cfg, tcfg = p.model, p.train
    twin = cfg.standard_twin()
    rbar, k = cfg.mean_recur, tcfg.bptt_k
    tokens = batch_size * cfg.seq_len
    log(f"bench train: preset {preset}, batch {batch_size}×{cfg.seq_len}, r̄={rbar}, k={k}, device {dev}")

    peak_bf16 = measure_peak_flops(dev, torch.bfloat16)
    peak_fp32 = measure_peak_flops(dev, torch.float32)
    rows = []

    def case(name: str, model_cfg: ModelConfig, compiled: bool, r: int | None, kk: int | None) -> dict:
        runner = Runner(model_cfg, tcfg, batch_size, dev, compiled)
        t0 = time.perf_counter()
        runner.step(r, kk)  # the first step pays for compilation
        first = time.perf_counter() - t0
        t = runner.timed(r, kk, warmup - 1, steps)
        fpt = flops_per_token(model_cfg, r, kk)
        row = {"case": name, "step_s": t, "first_step_s": first, "tok_s": tokens / t, "flops_per_token": fpt,
               "flops_s": fpt * tokens / t, "mfu": fpt * tokens / t / peak_bf16,
               "params": runner.model.num_params()["total"]}
        rows.append(row)
        log(f"  {name:<34} {t * 1e3:8.1f} ms/step  {row['tok_s']:8.0f} tok/s  "
            f"{row['flops_s'] / 1e9:7.1f} GFLOP/s  MFU {100 * row['mfu']:5.1f}%  (first step {first:.1f} s)")
        return row

    torch._dynamo.reset()
    rec_eager = case("recursive r=r̄ eager", cfg, False, rbar, k)
    std_eager = case("standard twin eager", twin, False, None, None)
    rec_comp = case("recursive r=r̄ compiled", cfg, True, rbar, k)
    std_comp = case("standard twin compiled", twin, True, None, None)

    # Sampled depth, compiled: warm up on the two graph kinds (a no-grad iteration exists only when r > k), then
    # count graphs compiled while ≥ 8 distinct r go by.
    runner = Runner(cfg, tcfg, batch_size, dev, True)
    runner.step(1, k)
    runner.step(cfg.r_max, k)
    before = graphs_compiled()
    sampler = DepthSampler("poisson-lognormal", rbar, cfg.r_max, tcfg.recur_sigma, seed=0)
    seen_r, times, flops = [], [], 0.0
    step = 0
    while step < sampled_steps or len(set(seen_r)) < 8:
        r = sampler.sample(step)[0] if step < sampled_steps else 1 + step % cfg.r_max
        times.append(runner.step(r, k))
        seen_r.append(r)
        flops += flops_per_token(cfg, r, k) * tokens
        step += 1
        if step > 4 * sampled_steps + cfg.r_max:
            break
    recompiles = graphs_compiled() - before
    sampled = {"case": "recursive sampled r compiled", "distinct_r": len(set(seen_r)), "recompiles": recompiles,
               "flops_s": flops / sum(times), "mfu": flops / sum(times) / peak_bf16}
    log(f"  {'recursive sampled r compiled':<34} {len(set(seen_r))} distinct r, {recompiles} graphs compiled after "
        f"warm-up, {sampled['flops_s'] / 1e9:.1f} GFLOP/s, MFU {100 * sampled['mfu']:.1f}%")

    # Truncated vs full BPTT memory at r = 4·r̄.
    r_deep = 4 * rbar
    mem_model = RecurrentLM(cfg).to(dev)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), device=dev)
    mem_trunc = saved_activation_bytes(mem_model, x, x, r_deep, rbar, dev)
    mem_full = saved_activation_bytes(mem_model, x, x, r_deep, r_deep, dev)
    log(f"  BPTT memory at r={r_deep}: truncated k={rbar} {mem_trunc / 2**20:.1f} MiB, full {mem_full / 2**20:.1f} MiB"
        f" → ratio {mem_trunc / mem_full:.3f}" + (" (CPU: activations saved for backward)" if dev.type == "cpu" else ""))

    result = {
        "device": dev.type,
        "preset": preset,
        "batch_size": batch_size,
        "seq_len": cfg.seq_len,
        "peak_flops_measured": peak_bf16,
        "peak_flops_measured_fp32": peak_fp32,
        "recursive_vs_unrolled_flops_ratio": rec_comp["flops_s"] / std_comp["flops_s"],
        "recursive_vs_unrolled_flops_ratio_eager": rec_eager["flops_s"] / std_eager["flops_s"],
        "compiled_vs_eager_speedup": rec_eager["step_s"] / rec_comp["step_s"],
        "mfu_recursive_compiled": rec_comp["mfu"],
        "mfu_standard_compiled": std_comp["mfu"],
        "mfu_recursive_sampled_compiled": sampled["mfu"],
        "recompiles_after_warmup": recompiles,
        "distinct_r_after_warmup": sampled["distinct_r"],
        "bptt_memory_ratio": mem_trunc / mem_full,
        "bptt_memory_bytes": {"truncated": mem_trunc, "full": mem_full, "r": r_deep, "k": rbar},
        "params": {"recursive": rec_eager["params"], "standard": std_eager["params"]},
        "cases": rows + [sampled],
    }
    log(f"peak matmul: bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")
    log(f"ratios: recursive/unrolled FLOP/s (compiled) {result['recursive_vs_unrolled_flops_ratio']:.3f}, "
        f"compiled/eager speedup {result['compiled_vs_eager_speedup']:.2f}×, MFU recursive compiled "
        f"{100 * result['mfu_recursive_compiled']:.1f}%, recompiles after warm-up {recompiles}, "
        f"BPTT memory ratio {result['bptt_memory_ratio']:.3f}")
    return result
