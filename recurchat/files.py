"""Files on disk: where recurchat keeps its caches ($RECURCHAT_HOME), and atomic writes.

An atomic write goes to a temp file in the target's directory, is fsynced, then os.replace'd into place: a crash (or
a second process writing the same cache) never leaves a half-written file under the final name. This is the base
layer (with config.py and errors.py), so data/, model/ and everything above may use it.
Exercised by `pytest tests/test_files.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def recurchat_home() -> Path:
    """Where recurchat keeps caches and runs: $RECURCHAT_HOME, else ~/.cache/recurchat."""
    return Path(os.environ.get("RECURCHAT_HOME") or Path.home() / ".cache" / "recurchat").expanduser()


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open a binary temp file next to `path`; on clean exit it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is a rename within one filesystem (atomic), never a cross-device copy.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result gets what open() would have given it
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically (results, reports, benchmark output)."""
    atomic_write_text(path, json.dumps(obj, indent=2))


# ---- manifests: every file of a directory with its size and hash ------------------------------------------------
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "recurchat-manifest"
# sha256 through hashlib (OpenSSL, with the CPU's SHA extensions where it has them): no extra dependency, a hash
# every tool can recompute (`sha256sum`), and on the machines we measured fast enough that verifying costs a small
# fraction of loading the same bytes (docs: `recurchat checkpoint verify` prints the time). xxhash would be faster
# still but is one more package, and its digests are not something a user can check by hand.
MANIFEST_HASH = "sha256"


def file_digest(path: Path) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, MANIFEST_HASH).hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """`directory`/manifest.json: every file below it (but the manifest) with its size and sha256."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, MANIFEST_HASH: file_digest(p)}
               for p in files}
    target = directory / MANIFEST_FILE
    atomic_write_json(target, {"format": MANIFEST_FORMAT, "hash": MANIFEST_HASH, "files": entries})
    return target


def manifest_problem(directory: str | Path) -> str | None:
    """Why `directory` does not match its manifest (the first problem found), or None when every listed file is
    there with its size and hash. A directory without a manifest is "no manifest"; files written after it (an exit
    calibration beside the weights) are not its business."""
    file = Path(directory) / MANIFEST_FILE
    if not file.is_file():
        return "no manifest"
    try:
        manifest = json.loads(file.read_text())
        entries = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(entries, dict):
            raise ValueError("not a recurchat manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({e})"
    for name, entry in entries.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} is {path.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if file_digest(path) != entry.get(MANIFEST_HASH):
            return f"{name} does not match its {MANIFEST_HASH} (damaged)"
    return None
