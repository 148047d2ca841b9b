"""One command from nothing to a report card: the recursive model against its two standard baselines.

    recurchat speedrun --preset cpu-smoke --out runs/speedrun-smoke     # tiny, about a minute (runs in CI)
    recurchat speedrun --preset cpu --out runs/speedrun                 # cpu-tiny models, the CPU report card

Stages: pretrain the recursive model, its iso-FLOP twin (P + r̄·R + C distinct blocks; directory `standard`) and
its iso-params model (P + R + C blocks) on the same tokens and schedule → SFT all three on the depth probe, pointer
chasing (`chain`) at difficulties 1..D, with the recursion sampler → evaluate the bases (held-out bpb over r) and
the SFT models (plain-text bpb, and chain accuracy by difficulty on 1..2D over r ∈ {1, 2, r̄, 2r̄, 4r̄, 8r̄} and
under exit criteria) → the depth probes (speedrun/probes.py: parity, S3 and pointer chasing, by a curriculum, on
all three models, the recursive one's exit calibrated on each) → DIR/report.md (card.py), which opens with them.
Every stage calls the library function behind the command a user would type (`train` with a RunSpec,
`evaluate_checkpoint`). A finished stage is recorded in DIR/stages.json and skipped on the next run; an interrupted
training stage resumes from its last checkpoint (saved every ~10%).
Exercised by `pytest tests/test_speedrun.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from recurchat.config import get_preset
from recurchat.errors import UserError
from recurchat.eval.evaluate import EvalRequest, evaluate_checkpoint
from recurchat.files import atomic_write_text
from recurchat.model.hardware import set_threads
from recurchat.speedrun.report_card import report_card
from recurchat.speedrun.probes import probe_stages
from recurchat.train.spec import pretrain_spec, sft_spec
from recurchat.train.trainer import train_or_resume


@dataclass(frozen=True)
class SpeedrunPreset:
    model_preset: str
    pretrain_steps: int
    sft_steps: int
    sft_examples: int
    sft_batch_size: int
    limit: int  # evaluation examples per task (chain: spread evenly over its levels)
    eval_tokens: int
    probe_levels: int = 4  # D: SFT on chain difficulties 1..D, evaluate on 1..2D
    depths: str = "1,2,4,8,16,32"  # 1, 2, r̄, 2r̄, 4r̄, 8r̄ for r̄ = 4
    exits: str = "kl:3e-2,kl:1e-1,latent:5e-2"  # the first is where recursions by difficulty are measured
    # labelled-sequence probes (speedrun/probes.py), each trained from scratch on the three models: state tracking in
    # one stage of probe_steps, pointer chasing by a curriculum of one stage per hop count (chains of 1, 1-2, 1-3),
    # chase_steps each
    probes: tuple[str, ...] = ("parity:1-8", "s3:1-8", "chase:1-3")
    probe_steps: int = 2000
    chase_steps: tuple[int, ...] = (1200, 3000, 4000)
    probe_limit: int = 256  # held-out sequences per probe evaluation (and as many again to calibrate on)

    @property
    def sft_data(self) -> str:
        return f"builtin:chain:1-{self.probe_levels}"

    @property
    def tasks(self) -> str:
        return f"bpb,chain:1-{2 * self.probe_levels}"


SPEEDRUNS = {
    "cpu-smoke": SpeedrunPreset("cpu-smoke", pretrain_steps=30, sft_steps=20, sft_examples=200, sft_batch_size=8,
                                limit=8, eval_tokens=2048, probe_levels=2, depths="1,2,4,8",
                                probes=("parity:1-4", "chase:1-2"), probe_steps=100, chase_steps=(20, 20),
                                probe_limit=16),
    "cpu": SpeedrunPreset("cpu-tiny", pretrain_steps=400, sft_steps=300, sft_examples=5000, sft_batch_size=32,
                          limit=400, eval_tokens=8192),
    "gpu-d20": SpeedrunPreset("gpu-d20", pretrain_steps=20000, sft_steps=1000, sft_examples=20000, sft_batch_size=32,
                              limit=800, eval_tokens=10 * 524288, probe_levels=8),
}
# (run directory, the baseline `pretrain_spec` builds): the iso-FLOP twin keeps the directory name `standard`
MODELS = (("recursive", ""), ("standard", "iso-flops"), ("iso-params", "iso-params"))


def run_stage(out: Path, name: str, fn) -> None:
    """Run `fn` unless stages.json says `name` finished; record its wall time."""
    path = out / "stages.json"
    stages = json.loads(path.read_text()) if path.exists() else {}
    if name in stages:
        print(f"[speedrun] {name}: done earlier ({stages[name]:.0f} s), skipping", flush=True)
        return
    print(f"[speedrun] {name} ...", flush=True)
    t0 = time.perf_counter()
    fn()
    stages[name] = time.perf_counter() - t0
    atomic_write_text(path, json.dumps(stages, indent=2))


def pretrain_settings(sp: SpeedrunPreset, data: str | None, dtype: str) -> dict:
    # a checkpoint every ~10% of a stage, so an interrupted stage loses at most that much
    return {"max_steps": sp.pretrain_steps, "save_every": max(10, sp.pretrain_steps // 10), "dtype": dtype,
            **({"data": data} if data else {})}


def sft_settings(sp: SpeedrunPreset, dtype: str) -> dict:
    return {"data": sp.sft_data, "max_steps": sp.sft_steps, "save_every": max(10, sp.sft_steps // 10),
            "batch_size": sp.sft_batch_size, "dtype": dtype,
            "total_batch_tokens": get_preset(sp.model_preset).model.seq_len * sp.sft_batch_size,
            "sft_examples": sp.sft_examples}


def evaluate_stage(out: Path, name: str, sp: SpeedrunPreset, data: str | None, dtype: str) -> None:
    """The base's held-out bpb over r (eval-base-NAME.json), then the SFT model's plain-text bpb and probe accuracy
    by difficulty over r and exits (eval-NAME.json); a standard model is evaluated at r = 1 only."""
    common = dict(recur=sp.depths, eval_tokens=sp.eval_tokens, quiet=True, dtype=dtype, data=data)
    evaluate_checkpoint(EvalRequest(ckpt=str(out / name), tasks="bpb", limit=1,
                                    json=str(out / f"eval-base-{name}.json"), **common))
    evaluate_checkpoint(EvalRequest(ckpt=str(out / f"{name}-sft"), tasks=sp.tasks, exit=sp.exits, limit=sp.limit,
                                    max_tokens=8, json=str(out / f"eval-{name}.json"), **common))


def speedrun(preset_name: str, out: str | Path, data: str | None = None, dtype: str = "auto",
             threads: int = 0) -> Path:
    """Every stage, then the report card; `dtype` goes to every stage, `threads` (0 = torch's default) to torch."""
    set_threads(threads)
    if preset_name not in SPEEDRUNS:
        raise UserError(f"unknown speedrun preset {preset_name!r} (choose from {', '.join(SPEEDRUNS)})")
    sp = SPEEDRUNS[preset_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, standard in MODELS:
        run = out / name
        settings = pretrain_settings(sp, data, dtype)
        run_stage(out, f"pretrain {name}", lambda run=run, standard=standard: train_or_resume(
            run, lambda: pretrain_spec(sp.model_preset, run, standard=standard, train=settings, overwrite=True)))
    for name, _ in MODELS:
        run = out / f"{name}-sft"
        run_stage(out, f"sft {name}", lambda run=run, base=out / name: train_or_resume(
            run, lambda: sft_spec(base, run, train=sft_settings(sp, dtype), overwrite=True)))
    for name, _ in MODELS:
        run_stage(out, f"eval {name}", lambda name=name: evaluate_stage(out, name, sp, data, dtype))
    probe_stages(out, sp, MODELS, dtype, run_stage)
    path = report_card(out, preset_name, sp, MODELS)
    print(f"[speedrun] report card: {path}", flush=True)
    return path

