"""Run telemetry: StepMetrics (one step's figures), metrics.jsonl (one JSON object per line), optional wandb, and a
tqdm progress bar.

Only rank 0 writes. wandb is used when installed and a project is given; without WANDB_API_KEY it runs offline
(files under the run directory, sync later with `wandb sync`). Exercise: `pytest tests/train/test_trainer.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from recurchat.files import atomic_write_text


@dataclass
class StepMetrics:
    """One optimizer step's figures (`record()` is its metrics.jsonl line); after the last step `evaluation` holds
    the final held-out evaluation (val_bpb / val_bpb_text, or val_acc / val_acc_long for a probe)."""

    step: int
    loss: float
    r: list[int]
    lr_mult: float
    grad_norm: float
    tok_s: float
    flops_per_token: float
    mfu: float
    dt: float
    text_batches: int | None = None  # SFT mixing in pretraining text: how many micro-steps were text
    evaluation: dict = field(default_factory=dict)

    @property
    def r_mean(self) -> float:
        return sum(self.r) / len(self.r)

    def record(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("text_batches", "evaluation")}
        out["r_mean"] = self.r_mean
        if self.text_batches is not None:
            out["text_batches"] = self.text_batches
        return out


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl-style log, skipping a last line a crash cut short."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step`: a run resumed from its step-N checkpoint logs steps N+1… again,
    and each step must appear once."""
    if path.exists():
        kept = [r for r in read_records(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class Telemetry:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 wandb_project: str = "", config: dict | None = None, progress: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                tqdm.write("wandb is not installed (pip install wandb); logging to metrics.jsonl only")
            else:
                if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                    os.environ["WANDB_MODE"] = "offline"
                self.wandb = wandb.init(project=wandb_project, dir=str(out_dir), config=config or {})
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def progress(self, **fields) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(fields, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
