"""Files written beside a checkpoint's weights after it was saved: the calibrated exit and the learned exit gate.

    save_calibration(run, result) / calibrated_exit(run) / resolve_exit("auto", run)   (recurchat calibrate)
    save_exit_gate(run, gate, info) / load_exit_gate(run)                               (recurchat exit-train)

They live in the step directory the run resolves to, outside its manifest (which lists what the save wrote), and
each is checked when read. Exercise: `pytest tests/eval/test_calibrate.py tests/infer/test_gate.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from recurchat.checkpoint.locate import resolve
from recurchat.errors import UserError
from recurchat.files import atomic_write_bytes, atomic_write_text
from recurchat.model.exit_gate import ExitGate

CALIBRATION_FILE = "exit_calibration.json"  # written by `recurchat calibrate` beside the weights
AUTO_EXIT = "auto"


def save_calibration(path: str | Path, result: dict) -> Path:
    """Store a calibrated exit (eval/calibrate.py) in the checkpoint it was measured on."""
    target = resolve(path) / CALIBRATION_FILE
    atomic_write_text(target, json.dumps(result, indent=2))
    return target


def calibrated_exit(path: str | Path) -> str | None:
    """The exit criterion this checkpoint was calibrated with (`recurchat calibrate`), or None if it was not."""
    file = resolve(path) / CALIBRATION_FILE
    if not file.is_file():
        return None
    try:
        return str(json.loads(file.read_text())["exit"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{file} is not a calibration file (no \"exit\"); run recurchat calibrate again") from None


def resolve_exit(spec: str | None, path: str | Path) -> str | None:
    """`auto` → the exit criterion this checkpoint was calibrated with; any other spec (or None) unchanged."""
    if spec != AUTO_EXIT:
        return spec
    found = calibrated_exit(path)
    if found is None:
        raise UserError(f"--exit auto: {resolve(path)} has no calibrated exit yet; run "
                        f"`recurchat calibrate --ckpt {path} --criterion latent --max-bpb-loss 0.01` first")
    return found


EXIT_GATE_FILE = "exit_gate.safetensors"  # written by `recurchat exit-train` beside the weights


def save_exit_gate(path: str | Path, gate: ExitGate, info: dict) -> Path:
    """Store a trained exit gate (train/exit_gate.py) with its spec and training figures (`info`) in the checkpoint
    it was trained on."""
    target = resolve(path) / EXIT_GATE_FILE
    weights = {k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}
    metadata = {"spec": json.dumps(gate.spec), "info": json.dumps(info)}
    atomic_write_bytes(target, safetensors_bytes(weights, metadata=metadata))
    return target


def load_exit_gate(path: str | Path, device: torch.device | str = "cpu") -> ExitGate | None:
    """The exit gate trained for this checkpoint (`recurchat exit-train`), or None if it has none."""
    file = resolve(path) / EXIT_GATE_FILE
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            spec = json.loads(f.metadata()["spec"])
        gate = ExitGate(**spec)
        gate.load_state_dict(load_file(str(file)))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{file} is not an exit gate ({e}); run recurchat exit-train again") from None
    return gate.to(device).eval()
