"""RunSpec: what a training run is, resolved once (by the CLI or the speedrun) before the trainer starts.

    spec = pretrain_spec("cpu-tiny", "runs/tiny", train={"max_steps": 200})
    spec = sft_spec("runs/tiny", "runs/tiny-sft", train={"data": "builtin:hops,arith"})
    spec = resume_spec("runs/tiny", "runs/tiny", train={"max_steps": 400})
    spec = init_spec("runs/smollm2-retro", "runs/smollm2-healed", train={"max_steps": 300})
    recurchat.train.trainer.train(spec)

The stage (pretrain | sft) and the data are said once, in `spec.train` (TrainConfig.stage, TrainConfig.data).
`base` is the checkpoint an SFT run (or a pretraining run started with --init-from: a heal) takes its weights and
tokenizer from; `resume` is the checkpoint a run continues exactly (weights, optimizer, data position, RNG). Each is
loaded here, once. `eval_depths` and `resumable_loader_state` are the two facts the trainer derives from a spec
before its first step.
Exercised by `pytest tests/train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from recurchat import checkpoint
from recurchat.checkpoint import Checkpoint
from recurchat.config import ModelConfig, TrainConfig, get_preset
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError

SFT_DEFAULTS = dict(max_steps=300, eval_every=100, stop_after=0, recur_dist="poisson-lognormal",
                    stage="sft", dtype="auto")  # a short schedule (warmup: SFT_WARMUP_FRAC of it); dtype per machine
SFT_WARMUP_FRAC = 0.1
# SFT trains at this fraction of the pretraining learning rates: at the full rates (and no warmup) a cpu-tiny model's
# plain-text bpb went from 1.31 to 8.47 after 300 steps of builtin:hops,arith; at 0.1× with warmup, to 1.37 (README).
SFT_LR_FRAC = 0.1
LR_FIELDS = ("lr_matrix", "lr_embed", "lr_head", "lr_scalar")


@dataclass
class RunSpec:
    model: ModelConfig
    train: TrainConfig
    out: Path
    base: Checkpoint | None = None  # SFT, --init-from: the weights and tokenizer to start from
    resume: Checkpoint | None = None  # continue this checkpoint exactly
    batch_size_given: bool = False  # --batch-size was on the command line: never adapt it to the world size

    @property
    def is_sft(self) -> bool:
        return self.train.stage == "sft"

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer the run must use, when a checkpoint fixes it (otherwise pretraining trains one)."""
        known = self.resume or self.base
        return known.tokenizer if known is not None else None


def _fresh_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if (out / "checkpoint").exists() and not overwrite:
        raise UserError(f"{out} already holds a checkpoint: pass --resume {out} to continue it, "
                        "or --overwrite to start over")
    return out


def pretrain_spec(preset: str, out: str | Path, *, standard: str = "", model: dict | None = None,
                  train: dict | None = None, overwrite: bool = False) -> RunSpec:
    """A new pretraining run: the preset with field overrides, or with `standard` = iso-flops | iso-params its
    standard twin (built from the overridden recursive config, so the twin follows --d-model, --mean-recur, …)."""
    p = get_preset(preset)
    model_cfg = dataclasses.replace(p.model, **(model or {}))
    if standard:
        model_cfg = model_cfg.twin(standard)
    spec = RunSpec(model_cfg, dataclasses.replace(p.train, **(train or {})), _fresh_out(out, overwrite))
    return validate(spec)


def sft_spec(base: str | Path, out: str | Path, *, train: dict | None = None, overwrite: bool = False) -> RunSpec:
    """A new SFT run from the checkpoint `base`: its model and settings, SFT_DEFAULTS, its learning rates × SFT_LR_FRAC,
    then `train` overrides."""
    out = _fresh_out(out, overwrite)
    ck = checkpoint.load(base)
    pre = ck.train_cfg
    pretrained = pre.stage == "pretrain"  # an SFT base already trains at SFT rates
    derived = {"pretrain_data": pre.data if pretrained else pre.pretrain_data,
               **{k: getattr(pre, k) * (SFT_LR_FRAC if pretrained else 1.0) for k in LR_FIELDS}}
    train_cfg = dataclasses.replace(pre, **{**SFT_DEFAULTS, **derived, **(train or {})})
    if "warmup_steps" not in (train or {}):
        train_cfg.warmup_steps = max(1, int(SFT_WARMUP_FRAC * train_cfg.max_steps))
    return validate(RunSpec(ck.model_cfg, train_cfg, out, base=ck))


def init_spec(base: str | Path, out: str | Path, *, model: dict | None = None, train: dict | None = None,
              overwrite: bool = False) -> RunSpec:
    """A new pretraining run that starts from the weights and tokenizer of checkpoint `base` (an imported or
    retrofitted model, healed on text): its model and training settings, then overrides. Model overrides may change
    anything that keeps the weights' shapes (seq_len, mean_recur, r_max, bptt …); loading the weights checks it."""
    out = _fresh_out(out, overwrite)
    ck = checkpoint.load(base)
    model_cfg = dataclasses.replace(ck.model_cfg, **(model or {}))
    train_cfg = dataclasses.replace(ck.train_cfg, **{"stage": "pretrain", **(train or {})})
    if train_cfg.stage != "pretrain":
        raise UserError("--init-from starts a pretraining run; for SFT use recurchat sft --ckpt")
    return validate(RunSpec(model_cfg, train_cfg, out, base=ck))


def resume_spec(path: str | Path, out: str | Path, *, model: dict | None = None,
                train: dict | None = None) -> RunSpec:
    """Continue the run whose checkpoint is at `path` (a run or checkpoint directory), writing to `out`."""
    ck = checkpoint.load(path)
    if not ck.has_state():
        raise UserError(f"--resume {path}: checkpoint has no resumable state")
    model_cfg = dataclasses.replace(ck.model_cfg, **(model or {}))
    if model_cfg != ck.model_cfg:
        diff = [k for k, v in (model or {}).items() if getattr(ck.model_cfg, k) != v]
        raise UserError(f"--resume {path}: model config differs from the checkpoint in {', '.join(diff)}")
    return validate(RunSpec(model_cfg, dataclasses.replace(ck.train_cfg, **(train or {})), Path(out), resume=ck))


def fit_batch_to_world(spec: RunSpec, world_size: int) -> tuple[RunSpec, str | None]:
    """(the spec, a line saying what changed) with a per-rank batch that splits `total_batch_tokens` evenly over
    `world_size` ranks: the largest one up to the configured batch, so a preset's global batch holds under torchrun.
    Where even one row per rank is more than the global batch, the global batch grows to one row per rank. An
    explicit --batch-size, or one that already fits, is left as it is (accumulation_steps then says what is wrong)."""
    t, rows = spec.train, spec.model.seq_len * world_size
    fits = t.total_batch_tokens % (t.batch_size * rows) == 0
    if spec.batch_size_given or fits:
        return spec, None
    if t.total_batch_tokens < rows:
        train = dataclasses.replace(t, batch_size=1, total_batch_tokens=rows)
        return dataclasses.replace(spec, train=train), (
            f"note: {world_size} ranks × seq_len {spec.model.seq_len} exceed total_batch_tokens="
            f"{t.total_batch_tokens}; the global batch grows to {rows} tokens (batch size 1 per rank)")
    batch = max((b for b in range(1, t.batch_size + 1) if t.total_batch_tokens % (b * rows) == 0), default=None)
    if batch is None:
        return spec, None
    return dataclasses.replace(spec, train=dataclasses.replace(t, batch_size=batch)), (
        f"note: batch size {batch} per rank (not {t.batch_size}) keeps total_batch_tokens={t.total_batch_tokens} "
        f"on {world_size} ranks")


def validate(spec: RunSpec) -> RunSpec:
    spec.model.validate()
    spec.train.validate()
    if spec.is_sft and not spec.train.data:
        raise UserError("sft needs --data FILE.jsonl or --data builtin:hops,arith,…")
    if spec.is_sft and spec.tokenizer is None:
        raise UserError("sft needs --ckpt BASE (the pretrained checkpoint) or --resume DIR")
    if spec.is_sft and spec.base is not None and spec.base.model_cfg != spec.model:
        raise UserError(f"--ckpt {spec.base.path}: model config differs from the requested one")
    return spec


def resumable_loader_state(state: dict, global_rows: int, grad_accum: int) -> dict:
    """The checkpoint's data position, re-expressed for this run's split of a step into ranks × micro-batches.

    The position is a global row offset, so only the rows per optimizer step must agree. A run that kept
    --batch-size and changed its world size (accumulation adapting) splits the same rows differently; the loader
    itself only accepts an unchanged world_size × batch_size, so relabel the split here and let it check the rest
    (seq_len, data). Beyond the next epoch end the two splits may skip a different handful of leftover rows.
    """
    saved = dict(state["loader"])
    rows_per_step_then = saved.get("global_batch_rows", 0) * int(state.get("grad_accum", 0))
    if saved.get("global_batch_rows") != global_rows and rows_per_step_then == global_rows * grad_accum:
        saved["global_batch_rows"] = global_rows
    return saved


def eval_depths(model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[int]:
    if not model_cfg.recursive:
        return [1]
    if train_cfg.eval_recur:
        try:
            depths = [int(r) for r in train_cfg.eval_recur.split(",") if r.strip()]
        except ValueError:
            raise UserError(f"bad --eval-recur {train_cfg.eval_recur!r}: expected comma-separated integers") from None
    else:
        depths = [1, model_cfg.mean_recur, 2 * model_cfg.mean_recur]
    return sorted({min(max(1, r), model_cfg.r_max) for r in depths})
