"""Checkpoints: a directory with model.safetensors, config.json, tokenizer.json and resumable state.

    CKPT/model.safetensors         weights (safetensors: loading never unpickles anything)
    CKPT/config.json               {"format": "recurchat-checkpoint", "model": {...}, "train": {...}}
    CKPT/tokenizer.json            the HF tokenizers file
    CKPT/chat_format.json          only for an imported tokenizer: its source's chat markup (data/tokenizer.py)
    CKPT/state/optimizer.safetensors + state/trainer.json   optimizer tensors; step, data position, RNG states
    CKPT/manifest.json             every file above with its size and sha256 (files.py), written before the rename

A run directory (`--out DIR`) keeps its checkpoints as DIR/checkpoint/step-NNNNNN/ with a `latest` file naming the
newest, and the newest `keep_checkpoints` of them (save_step). A step is written to a temporary directory, every
file fsynced, renamed into place, the parent fsynced, and only then `latest` replaced (atomically) and older steps
pruned; so a crash at any point leaves the previous complete step, and `resolve` never returns a partial one.
Before writing, the free space is checked against the step's size; a full disk (or any OSError) mid-save is one
line naming what, where, and the bytes needed and free, with the temporary directory removed and the previous step
intact. Loading verifies: a run directory resolves to the newest step whose files match its manifest (a damaged
newer step is skipped with a one-line note), an explicit step that does not match is a one-line error, a step
written before manifests loads with a note, and weights holding NaN or Inf are refused.
Every command that takes `--ckpt` accepts a run directory, its checkpoint/ directory, a step directory, or the
single-directory layout of older runs (DIR/checkpoint/ holding the files). This package sits between model/ and
infer/: serving, evaluation, benchmarks and training all load through it, and it imports nothing above model/.
Saving and loading are here; which step a path means (and verifying it) is locate.py; the files written beside the
weights later (the calibrated exit, the exit gate) are sidecars.py; all of it is re-exported from here.
Exercise: `pytest tests/test_checkpoint.py tests/test_checkpoint_integrity.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recurchat.checkpoint.locate import (
    NO_MANIFEST,
    STEP_PREFIX,
    find,
    newest_good_step,
    note_once,
    resolve,
    step_number,
    step_problem,
    steps_to_verify,
)
from recurchat.checkpoint.sidecars import (
    AUTO_EXIT,
    CALIBRATION_FILE,
    EXIT_GATE_FILE,
    calibrated_exit,
    load_exit_gate,
    resolve_exit,
    save_calibration,
    save_exit_gate,
)
from recurchat.config import ModelConfig, TrainConfig, config_from_dict
from recurchat.data.tokenizer import ChatFormat, Tokenizer
from recurchat.errors import UserError
from recurchat.files import MANIFEST_FILE, atomic_write_text, write_manifest
from recurchat.model.hardware import resolve_device
from recurchat.model.recurrent import RecurrentLM

__all__ = ["AUTO_EXIT", "CALIBRATION_FILE", "CHAT_FORMAT_FILE", "EXIT_GATE_FILE", "FORMAT", "NO_MANIFEST",
           "STEP_PREFIX", "VERSION", "Checkpoint", "calibrated_exit", "find", "load", "load_chat_format",
           "load_exit_gate", "load_model", "load_model_weights", "load_train_state", "newest_good_step", "note_once", "prune", "resolve", "resolve_exit", "save", "save_calibration", "save_exit_gate", "save_step",
           "step_number", "step_problem", "steps_to_verify"]

FORMAT = "recurchat-checkpoint"
VERSION = 1
CHAT_FORMAT_FILE = "chat_format.json"


@dataclass
class Checkpoint:
    path: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]

    def has_state(self) -> bool:
        return (self.path / "state" / "trainer.json").is_file()


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root` and every directory (so the renames that follow publish whole files)."""
    for p in sorted(root.rglob("*"), reverse=True):
        _fsync(p)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_step(root: str | Path, step: int, *args, keep: int = 2, **kwargs) -> Path:
    """Write checkpoint `root`/step-NNNNNN (args as for save), point `root`/latest at it, keep the newest `keep`."""
    root = Path(root)
    path = save(root / f"{STEP_PREFIX}{step:06d}", *args, **kwargs)
    atomic_write_text(root / "latest", path.name + "\n")
    _fsync(root)
    prune(root, path, keep)
    return path


def prune(root: Path, newest: Path, keep: int) -> None:
    """Keep `newest` and the keep − 1 steps before it. Steps after it and the files of the single-directory layout
    belong to a run that --overwrite replaced: they go now that the new run has a checkpoint of its own."""
    steps = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name <= newest.name)
    doomed = steps[:-max(1, keep)] + [p for p in root.glob(f"{STEP_PREFIX}*") if p.name > newest.name]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", CHAT_FORMAT_FILE, MANIFEST_FILE):
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / "state", ignore_errors=True)


def _flatten_optimizers(optimizers, states: list[dict]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, meta = {}, []
    for i, (opt, sd) in enumerate(zip(optimizers, states)):
        state_meta = {}
        for pid, pstate in sd["state"].items():
            scalars = {}
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    tensors[f"{i}.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[key] = value
            state_meta[str(pid)] = {"tensors": [k for k, v in pstate.items() if torch.is_tensor(v)],
                                    "scalars": scalars}
        meta.append({"type": type(opt).__name__, "param_groups": sd["param_groups"], "state": state_meta})
    return tensors, meta


def _unflatten_optimizers(optimizers, tensors: dict[str, torch.Tensor], meta: list[dict]) -> list[dict]:
    if len(meta) != len(optimizers) or any(m["type"] != type(o).__name__ for m, o in zip(meta, optimizers)):
        raise UserError("checkpoint optimizer state does not match this run's optimizers")
    states = []
    for i, m in enumerate(meta):
        state = {}
        for pid, entry in m["state"].items():
            s = dict(entry["scalars"])
            for key in entry["tensors"]:
                s[key] = tensors[f"{i}.{pid}.{key}"]
            state[int(pid)] = s
        states.append({"state": state, "param_groups": m["param_groups"]})
    return states


def _load_directly(optimizers, states: list[dict]) -> None:
    for opt, sd in zip(optimizers, states):
        opt.load_state_dict(sd)


def save(path: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig,
         tokenizer: Tokenizer, optimizers=None, trainer_state: dict | None = None, *,
         weights: dict[str, torch.Tensor] | None = None, optimizer_states: list[dict] | None = None) -> Path:
    """Write a checkpoint atomically (temp dir with its manifest, then rename); returns its path.

    `weights` / `optimizer_states` replace model.state_dict() / opt.state_dict() when the caller already gathered
    full tensors (FSDP2 shards both; see train/distributed.py), so the files look the same for any world size.
    A full disk or any other OSError is a UserError (what, where, bytes needed and free) and leaves no temp files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if weights is None else weights
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    state = None
    if optimizers is not None and trainer_state is not None:
        state = optimizer_files(optimizers, optimizer_states, trainer_state)
    needed = sum(t.numel() * t.element_size() for group in (weights, state[0] if state else {})
                 for t in group.values()) + (1 << 20)  # + configs, tokenizer, headers
    check_free_space(path.parent, needed)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_step_files(tmp, weights, model_cfg, train_cfg, tokenizer, state)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(path.parent).free
        kept = "the previous checkpoint is intact" if any(path.parent.glob("step-*")) else "no checkpoint was saved"
        raise UserError(f"could not save checkpoint {path}: {e} ({needed / 1e6:.1f} MB needed, {free / 1e6:.1f} MB "
                        f"free on {path.parent}); {kept}") from None
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(f"not enough space to save a checkpoint in {directory}: {needed / 1e6:.1f} MB needed, "
                        f"{free / 1e6:.1f} MB free (free some space, or lower --keep-checkpoints)")


def optimizer_files(optimizers, optimizer_states: list[dict] | None, trainer_state: dict) -> tuple[dict, dict]:
    """(tensors of state/optimizer.safetensors, state/trainer.json) for a resumable checkpoint."""
    if optimizer_states is None:
        optimizer_states = [opt.state_dict() for opt in optimizers]
    tensors, meta = _flatten_optimizers(optimizers, optimizer_states)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    return tensors, dict(trainer_state, optimizers=meta)


def write_step_files(tmp: Path, weights: dict, model_cfg: ModelConfig, train_cfg: TrainConfig, tokenizer: Tokenizer,
                     state: tuple[dict, dict] | None) -> None:
    """Every file of a step into `tmp`, then its manifest, all fsynced."""
    (tmp / "state").mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    config = {"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(model_cfg),
              "train": dataclasses.asdict(train_cfg)}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(tmp / "tokenizer.json")
    if tokenizer.chat_format is not None:
        (tmp / CHAT_FORMAT_FILE).write_text(tokenizer.chat_format.to_json())
    if state is not None:
        save_file(state[0], str(tmp / "state" / "optimizer.safetensors"))
        (tmp / "state" / "trainer.json").write_text(json.dumps(state[1], indent=2))
    write_manifest(tmp)
    _fsync_tree(tmp)


def load(path: str | Path) -> Checkpoint:
    """Read config, tokenizer and weights; UserError for anything missing, foreign or corrupt."""
    path = resolve(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a recurchat checkpoint (config.json has no format={FORMAT!r})")
    if not (path / MANIFEST_FILE).is_file():
        note_once(f"{path} has no manifest (written before manifests): loading it unverified")
    model_cfg = config_from_dict(ModelConfig, config.get("model", {})).validate()
    train_cfg = config_from_dict(TrainConfig, config.get("train", {}))
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"checkpoint {path} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(path / "tokenizer.json", load_chat_format(path))
    weights_file = path / "model.safetensors"
    if not weights_file.is_file():
        raise UserError(f"checkpoint {path} has no model.safetensors")
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_file} is corrupt ({e})") from None
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"{weights_file}: {bad} holds NaN or Inf (a diverged run?); refusing to load it")
    return Checkpoint(path, model_cfg, train_cfg, tokenizer, weights)


def load_chat_format(path: Path) -> ChatFormat | None:
    """The chat format saved beside an imported tokenizer, or None for recurchat's own tokenizer."""
    file = path / CHAT_FORMAT_FILE
    return ChatFormat.from_json(file.read_text(), str(file)) if file.is_file() else None


def load_model_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    shapes = model.state_dict()
    wrong = [k for k, v in ckpt.weights.items() if k in shapes and shapes[k].shape != v.shape]
    if wrong:
        raise UserError(f"checkpoint {ckpt.path}: config.json does not describe its weights ({wrong[0]} is "
                        f"{tuple(ckpt.weights[wrong[0]].shape)}, the config makes {tuple(shapes[wrong[0]].shape)})")
    missing, unexpected = model.load_state_dict(ckpt.weights, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt.path} does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")


def load_model(path: str | Path, device: str = "auto"):
    """(Checkpoint, RecurrentLM in eval mode on `device`): the one loading path every command uses."""
    ckpt = load(path)
    dev = resolve_device(device)
    model = RecurrentLM(ckpt.model_cfg)
    load_model_weights(model, ckpt)
    return ckpt, model.to(dev).eval()


def load_train_state(ckpt: Checkpoint, optimizers, load_optimizers=_load_directly) -> dict:
    """Restore optimizer tensors and RNG; return the trainer JSON (step, loader position, ...).

    `load_optimizers(optimizers, states)` installs the per-optimizer state dicts (full tensors); the trainer
    passes one that re-shards them under FSDP2.
    """
    if not ckpt.has_state():
        raise UserError(f"checkpoint {ckpt.path} has no resumable state (state/trainer.json)")
    try:
        state = json.loads((ckpt.path / "state" / "trainer.json").read_text())
        tensors = load_file(str(ckpt.path / "state" / "optimizer.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as e:
        raise UserError(f"resumable state in {ckpt.path / 'state'} is corrupt ({e})") from None
    load_optimizers(optimizers, _unflatten_optimizers(optimizers, tensors, state.pop("optimizers")))
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    return state
