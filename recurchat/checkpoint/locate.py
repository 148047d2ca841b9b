"""Which checkpoint a path means: the newest step of a run directory whose files match its manifest.

`resolve` (and `find`, which returns None where there is none) accept a run directory, its checkpoint/ directory, a
step directory, or the single-directory layout of older runs. A damaged newer step is skipped with a one-line note;
an explicit step that does not match its manifest is a one-line error; a step written before manifests is used (the
loader says so). Verification (files.manifest_problem) is remembered per unchanged directory, so a command that
resolves the same checkpoint for its weights, calibration and exit gate hashes it once.
Exercise: `pytest tests/test_checkpoint_integrity.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recurchat.errors import UserError
from recurchat.files import manifest_problem

STEP_PREFIX = "step-"


def find(path: str | Path) -> Path | None:
    """The checkpoint `path` points at (see resolve), or None if it holds none: in a run directory the newest step
    that verifies (UserError if none does), else `path` itself if it verifies (UserError if it is damaged)."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        step = newest_good_step(candidate) if candidate.is_dir() else None
        if step is not None:
            return step
        if (candidate / "config.json").is_file():  # a step directory, or the single-directory layout of older runs
            problem = step_problem(candidate)
            if problem not in (None, NO_MANIFEST):
                raise UserError(f"checkpoint {candidate} is damaged: {problem}")
            return candidate
    return None


NO_MANIFEST = "no manifest"
_verified: dict[tuple, str | None] = {}
_said: set[str] = set()


def note_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(f"note: {line}", file=sys.stderr)


def step_problem(step: Path) -> str | None:
    """files.manifest_problem of a step directory, remembered while its files keep their sizes and times (a command
    resolves the same checkpoint several times: weights, calibration, exit gate)."""
    key = (str(step.resolve()),
           tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(step.rglob("*")) if p.is_file()))
    if key not in _verified:
        _verified[key] = manifest_problem(step)
    return _verified[key]


def newest_good_step(root: Path) -> Path | None:
    """The newest complete step of `root` (a checkpoint/ directory) whose files match its manifest, saying in one line
    which newer ones were skipped and why; None if `root` has no steps, UserError if none verifies. A step directory
    only ever appears whole (it is renamed into place), so this holds even after a crash between that rename and the
    update of `latest`, which is there for people and tools (`cat DIR/checkpoint/latest`)."""
    steps = sorted((p for p in root.glob(f"{STEP_PREFIX}*") if (p / "config.json").is_file()), reverse=True)
    for step in steps:
        problem = step_problem(step)
        if problem in (None, NO_MANIFEST):
            return step
        note_once(f"skipping {step} ({problem}); falling back to an older step")
    if steps:
        raise UserError(f"no checkpoint in {root} verifies (newest, {steps[0].name}: {step_problem(steps[0])})")
    return None


def steps_to_verify(path: str | Path) -> list[Path]:
    """Every step directory of a run (newest first, complete or not), or the one step `path` is."""
    path = Path(path)
    for root in (path / "checkpoint", path):
        steps = sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()), reverse=True) if root.is_dir() else []
        if steps:
            return steps
    if (path / "config.json").is_file():
        return [path]
    raise UserError(f"{path} holds no checkpoint")


def step_number(step: Path) -> int:
    """N of a step-NNNNNN directory; 0 for the single-directory layout of older runs."""
    return int(step.name[len(STEP_PREFIX):]) if step.name.startswith(STEP_PREFIX) else 0


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, a run directory, or a run's checkpoint/ directory → the newest complete checkpoint."""
    found = find(path)
    if found is not None:
        return found
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    raise UserError(f"{path} is not a recurchat checkpoint (no complete checkpoint in it or in {path / 'checkpoint'})")
