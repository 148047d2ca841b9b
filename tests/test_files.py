"""Atomic writes leave either the old file or the new one, never a partial one; $RECURCHAT_HOME is honoured.

Run: `pytest tests/test_files.py`.
"""

from __future__ import annotations

import pytest

from recurchat.files import atomic_open, atomic_write_text, recurchat_home


def test_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_recurchat_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECURCHAT_HOME", str(tmp_path))
    assert recurchat_home() == tmp_path
    monkeypatch.delenv("RECURCHAT_HOME")
    assert recurchat_home().parts[-2:] == (".cache", "recurchat")


def test_written_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    os.umask(old)
    atomic_write_text(tmp_path / "report.md", "hello")
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o666 & ~old
