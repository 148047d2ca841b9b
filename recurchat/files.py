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
