"""What this machine runs fast: the compute dtype behind `--dtype auto`, the peak FLOP/s behind MFU, the threads.

    python -m recurchat.model.hardware        # print this machine's banner (probes once, then reads the cache)

- Dtype. `auto` picks bf16 only where the device runs it natively: CUDA when
  `torch.cuda.is_bf16_supported(including_emulation=False)`; a CPU when a one-time probe (≤ 0.3 s) measures bf16
  matmul at ≥ 1.2× fp32. Everything else runs fp32. CPUs without AVX-512 BF16 / AMX emulate bf16 at ~1% of fp32
  speed (0.7 GFLOP/s against 136 on one AVX2 EPYC), so hard-coding bf16 makes training 20–60× slower there; an
  explicit `--dtype bf16` on such a machine still runs, after one warning that gives the measured ratio. A
  compiled decode step (`--compile` on sample, chat, serve, bench infer) of at most COMPILED_FP32_ROWS rows on a
  CPU decodes in fp32 under `auto`: inside a graph bf16 autocast keeps no cached bf16 copy of the weights, so every
  step casts every weight again, and at a small batch that costs more than bf16 matmuls save. An eager decode
  (sample, chat, serve, bench infer) decodes in fp32 where a one-time probe of its own matmuls at its batch finds
  bf16 at most SLOW_SMALL_BF16 of fp32's speed (on AMX Xeons oneDNN's small bf16 matmuls have a fixed cost).
- Peak FLOP/s. The best rate of matmuls of the model's own shapes ((rows × d)·(d × d), (d × 4d), (4d × d),
  (d × vocab)) in the chosen dtype, measured once per machine, dtype and shape set. It is the MFU denominator in
  metrics.jsonl, the progress bar, `recurchat bench` and the report card; `--peak-flops` overrides it, and the
  source (`measured` or `--peak-flops`) is recorded beside every MFU. No table of datasheet numbers: a table is
  right for one machine and silently wrong on every other.
- Memory bandwidth. The best read rate of a 256 MiB tensor (a sum over it), measured once per machine: the
  denominator of the bandwidth-limited decode rate in `recurchat bench infer`, where a small batch reads every
  weight once per step and does little arithmetic on it.
- All measurements are cached in $RECURCHAT_HOME/hardware.json, keyed by the machine (CPU model, its
  `torch.backends.cpu.get_cpu_capability()`, threads, torch version; or the GPU's name).

Exercised by `pytest tests/model/test_hardware.py`.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from recurchat.config import DTYPES, ModelConfig
from recurchat.errors import UserError
from recurchat.files import atomic_write_text, recurchat_home
from recurchat.model.flops import iterations, layer_uses

BF16_MIN_SPEEDUP = 1.2  # auto picks bf16 on a CPU only when its matmuls run at least this much faster than fp32
PROBE_SIZE = 256  # square matmul of the dtype probe: small enough that emulated bf16 stays within the time budget
# auto: a compiled CPU decode step of at most this many rows runs fp32 (cpu-tiny, 2-core AVX-512 EPYC, one process:
# fp32 376 against bf16 266 tok/s at 1 row, 1607 against 1388 at 8); larger batches keep bf16, whose matmul
# advantage grows with the rows while the casts stay one per weight
COMPILED_FP32_ROWS = 8
# auto: an eager CPU decode whose bf16 matmuls, at its batch and the model's shapes, run at most this fraction of
# fp32's speed decodes in fp32. cpu-tiny on a 2-core Xeon with AMX (oneDNN's small bf16 matmuls cost ~20 µs a call
# whatever their size): the probe reads 0.33× at 1 row and 0.62× at 8, and eager decoding fp32 213 against bf16 121
# tok/s at 1 row, 1173 against 829 at 8; on a 2-core AVX-512 EPYC an earlier probe of the same shapes read 0.76× at
# 1 row and eager bf16 decoded faster there (248 against 215). The cut sits between those readings.
SLOW_SMALL_BF16 = 0.7
_warned: set[str] = set()


# ---- device, threads and the machine's identity ----------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (auto | cpu | cuda | cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device here")
    return device


def set_threads(threads: int) -> int:
    """Use `threads` intra-op threads (0 = leave torch's default, what it sees); returns the number in use."""
    if threads < 0:
        raise UserError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """Human-readable: `cpu (AMD EPYC, AVX512)` or `cuda:0 (NVIDIA H200)`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()})"


def machine_key(device: torch.device) -> str:
    """What a cached measurement is valid for: the same hardware, instruction set, threads and torch."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}"
    return (f"{cpu_name()}|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()} threads"
            f"|torch {torch.__version__}")


# ---- the cache -----------------------------------------------------------------------------------------------

def cache_path() -> Path:
    return recurchat_home() / "hardware.json"


def cached(device: torch.device, entry: str, measure) -> float:
    """The cached value of `entry` for this machine, measuring (and caching) it the first time."""
    path = cache_path()
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    key = machine_key(device)
    if entry in table.get(key, {}):
        return float(table[key][entry])
    value = float(measure())
    table.setdefault(key, {})[entry] = value
    with contextlib.suppress(OSError):  # a read-only home only costs re-measuring next time
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True))
    return value


def sync(device: torch.device) -> None:
    """Wait for the device to finish queued work (a no-op on the CPU), so a timer measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_matrix(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Random values from a private generator: measuring never moves the global RNG a run's resume depends on."""
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(rows, cols, device=device, generator=g).to(dtype)


def best_seconds(run, device: torch.device, budget_s: float, max_reps: int = 10) -> float:
    """Fastest of up to `max_reps` timed calls of `run` after one warm-up, stopping once `budget_s` is spent."""
    run()
    sync(device)
    best, spent = float("inf"), 0.0
    for _ in range(max_reps):
        t0 = time.perf_counter()
        run()
        sync(device)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def best_matmul_seconds(a: torch.Tensor, b: torch.Tensor, budget_s: float, max_reps: int = 10) -> float:
    """Fastest of up to `max_reps` timed a @ b after one warm-up, stopping once `budget_s` is spent."""
    return best_seconds(lambda: a @ b, a.device, budget_s, max_reps)


# ---- dtype ---------------------------------------------------------------------------------------------------

def bf16_over_fp32_matmul(device: torch.device) -> float:
    """How much faster a bf16 matmul runs than fp32 here (< 1: bf16 is emulated); probed once, then cached."""
    size = PROBE_SIZE if device.type == "cpu" else 8 * PROBE_SIZE  # a GPU needs more work than launch overhead

    def seconds(dtype: torch.dtype) -> float:
        a = random_matrix(size, size, device, dtype)
        return best_matmul_seconds(a, a.T.contiguous(), budget_s=0.1)

    return cached(device, "bf16_over_fp32_matmul", lambda: seconds(torch.float32) / seconds(torch.bfloat16))


def decode_matmuls(cfg: ModelConfig, rows: int) -> dict[tuple[int, int, int], int]:
    """(m, k, n) → uses of the matmuls one decode step of `rows` rows makes at r̄: the attention and MLP
    projections of every block use (prelude, r̄ × shared stack, coda) and the head once."""
    iters = iterations(cfg, None)
    uses, d, hidden = layer_uses(cfg, iters), cfg.d_model, cfg.mlp_width
    matmuls = {(rows, d, d): 2 * uses, (rows, d, hidden): uses, (rows, hidden, d): uses, (rows, d, cfg.vocab_size): 1}
    return matmuls | ({(rows, 2 * d, d): iters} if iters else {})  # the adapter, once per iteration


def bf16_over_fp32_small_matmul(device: torch.device, matmuls: dict[tuple[int, int, int], int]) -> float:
    """How much faster the matmuls of `matmuls` ((m, k, n) → uses: a decode step's, m = its rows) run in bf16 than
    in fp32, with the bf16 weights cast beforehand as autocast's cache holds them over a generation; probed once per
    machine and shape set, then cached."""
    def seconds(dtype: torch.dtype) -> float:
        pairs = [(random_matrix(m, k, device, dtype), random_matrix(n, k, device, dtype), uses)
                 for (m, k, n), uses in matmuls.items()]
        return best_seconds(lambda: [torch.nn.functional.linear(x, w) for x, w, uses in pairs for _ in range(uses)],
                            device, budget_s=0.2, max_reps=10)

    entry = "bf16_over_fp32_small_matmul " + ",".join(f"{m}x{k}x{n}*{u}" for (m, k, n), u in matmuls.items())
    return cached(device, entry, lambda: seconds(torch.float32) / seconds(torch.bfloat16))


def native_bf16(device: torch.device) -> tuple[bool, str, float | None]:
    """(runs bf16 natively, why, the measured CPU ratio or None)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{torch.cuda.get_device_name(device)} {'has' if ok else 'lacks'} native bf16", None
    ratio = bf16_over_fp32_matmul(device)
    return ratio >= BF16_MIN_SPEEDUP, f"bf16 matmul runs at {ratio:.2f}× fp32 here", ratio


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # "bf16" | "fp32": what the model computes in (bf16 = autocast over fp32 master weights)
    reason: str
    bf16_over_fp32_matmul: float | None = None  # the CPU probe's ratio, when it ran

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The context every forward of this run goes through: bf16 autocast, or nothing for fp32."""
        if self.name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def decode_in_fp32(device: torch.device, why: str, compiled_rows: int | None,
                   eager_matmuls: dict[tuple[int, int, int], int] | None) -> str | None:
    """Why `auto` decodes in fp32 on a CPU that runs bf16 natively, or None: a small compiled batch, or an eager
    decode whose small bf16 matmuls are slow here (SLOW_SMALL_BF16)."""
    if device.type != "cpu":
        return None
    if compiled_rows is not None and compiled_rows <= COMPILED_FP32_ROWS:
        return (f"auto: {why}, but a compiled decode step of {compiled_rows} row{'s' * (compiled_rows > 1)} would "
                "cast every weight to bf16 at every step")
    if eager_matmuls:
        small = bf16_over_fp32_small_matmul(device, eager_matmuls)
        if small <= SLOW_SMALL_BF16:
            rows = next(iter(eager_matmuls))[0]
            return (f"auto: {why}, but at a decode batch of {rows} row{'s' * (rows > 1)} bf16 matmuls run at "
                    f"{small:.2f}× fp32")
    return None


def choose_dtype(requested: str, device: torch.device, compiled_decode_rows: int | None = None,
                 eager_decode_matmuls: dict[tuple[int, int, int], int] | None = None) -> DtypeChoice:
    """Resolve `--dtype auto|bf16|fp32` on `device` (see the module docstring); `compiled_decode_rows`: the batch of
    an engine whose decode steps run compiled; `eager_decode_matmuls`: the matmuls of an eager engine's decode step
    (decode_matmuls at its batch)."""
    if requested not in DTYPES:
        raise UserError(f"unknown dtype {requested!r} (choose from {' | '.join(DTYPES)})")
    if requested == "fp32":
        return DtypeChoice("fp32", "--dtype fp32")
    native, why, ratio = native_bf16(device)
    if requested == "auto":
        fp32_why = decode_in_fp32(device, why, compiled_decode_rows, eager_decode_matmuls) if native else None
        if fp32_why:
            return DtypeChoice("fp32", fp32_why, ratio)
        return DtypeChoice("bf16" if native else "fp32", f"auto: {why}", ratio)
    if not native and why not in _warned:
        _warned.add(why)
        print(f"warning: --dtype bf16 on a device that emulates it ({why}); --dtype auto would pick fp32",
              file=sys.stderr)
    return DtypeChoice("bf16", f"--dtype bf16 ({why})", ratio)


# ---- peak FLOP/s -----------------------------------------------------------------------------------------------

def matmul_shapes(cfg: ModelConfig, rows: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's matmuls for `rows` tokens: attention and MLP projections, and the head."""
    d, hidden = cfg.d_model, cfg.mlp_width
    return [(rows, d, d), (rows, d, hidden), (rows, hidden, d), (rows, d, cfg.vocab_size)]


def measure_peak_flops(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int]],
                       budget_s: float = 0.5) -> float:
    """The best FLOP/s over `shapes`, each timed as best-of-reps within its share of `budget_s`."""
    best = 0.0
    for m, k, n in shapes:
        a, b = random_matrix(m, k, device, dtype), random_matrix(k, n, device, dtype)
        best = max(best, 2 * m * k * n / best_matmul_seconds(a, b, budget_s / len(shapes)))
    return best


def peak_flops(device: torch.device, choice: DtypeChoice, cfg: ModelConfig, rows: int) -> float:
    """Measured (once per machine, dtype and shape set, then cached) peak of the model's matmuls."""
    shapes = matmul_shapes(cfg, rows)
    entry = f"peak_flops {choice.name} " + ",".join("x".join(map(str, s)) for s in shapes)
    return cached(device, entry, lambda: measure_peak_flops(device, choice.torch_dtype, shapes))


@dataclass(frozen=True)
class Peak:
    flops: float
    source: str  # "measured" | "--peak-flops"


def resolve_peak(device: torch.device, choice: DtypeChoice, cfg: ModelConfig, rows: int,
                 override: float = 0.0) -> Peak:
    """`--peak-flops` when given (> 0), else the measured peak of this model's matmuls."""
    if override > 0:
        return Peak(override, "--peak-flops")
    return Peak(peak_flops(device, choice, cfg, rows), "measured")


def memory_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes per second this device reads from memory: the best of a few timed sums over a `mib` MiB tensor (far
    larger than any cache); measured once per machine, then cached."""

    def probe() -> float:
        x = torch.ones(mib * 2**18, device=device)  # float32: 4 bytes each
        return x.numel() * x.element_size() / best_seconds(x.sum, device, budget_s=0.5, max_reps=5)

    return cached(device, f"memory_bandwidth {mib}MiB", probe)


# ---- the banner ------------------------------------------------------------------------------------------------

def banner(device: torch.device, choice: DtypeChoice, peak: Peak | None = None) -> str:
    """One line: device, CPU capability, dtype and why, threads, peak FLOP/s and where it came from."""
    text = f"device {device_label(device)}; dtype {choice.name} ({choice.reason}); {torch.get_num_threads()} threads"
    if peak is not None:
        text += f"; peak {peak.flops / 1e9:,.0f} GFLOP/s {choice.name} ({peak.source})"
    return text


def inference_banner(device: torch.device, choice: DtypeChoice, cfg: ModelConfig) -> str:
    """The banner of a command that only runs the model forward (eval, sample, chat, serve): peak at one context."""
    return banner(device, choice, resolve_peak(device, choice, cfg, rows=cfg.seq_len))


def run_record(device: torch.device, choice: DtypeChoice, peak: Peak) -> dict:
    """The same facts as JSON, for metrics.jsonl and benchmark results."""
    return {"device": device_label(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "dtype": choice.name, "dtype_reason": choice.reason,
            "bf16_over_fp32_matmul": choice.bf16_over_fp32_matmul, "threads": torch.get_num_threads(),
            "peak_flops": peak.flops, "peak_flops_source": peak.source}


if __name__ == "__main__":
    dev = resolve_device()
    picked = choose_dtype("auto", dev)
    preset = ModelConfig()
    print(banner(dev, picked, resolve_peak(dev, picked, preset, 8 * preset.seq_len)))
