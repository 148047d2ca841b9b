"""A full disk under real torchrun: a 2-rank run whose --out is a tiny tmpfs stops on every rank with rank 0's
one-line error, the previous step intact and verifying, no temp directory left and metrics.jsonl cut back to it.

Two real ways to fill a filesystem: too few bytes for the next step (refused by the free-space check before a byte
is written), and too few inodes (the kernel's ENOSPC while the step's files are being created, mid-save). Needs
permission to mount a tmpfs (root in this project's CI); elsewhere the injected-ENOSPC tests of
tests/test_checkpoint_integrity.py cover the same code. Run: `pytest tests/train/test_full_disk.py` (~60 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recurchat import checkpoint

TRAIN = ["train", "--preset", "cpu-smoke", "--quiet", "--eval-every", "0", "--dtype", "fp32", "--save-every", "2",
         "--keep-checkpoints", "2", "--max-steps", "6"]


def torchrun(args: list[str], home: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", RECURCHAT_HOME=str(home))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    return subprocess.run([*prefix, "recurchat", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, inodes) → a fresh tmpfs directory under tmp_path; unmounted at the end."""
    mounted = []

    def mount(size: int, inodes: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.fixture(scope="module")
def one_step_on_disk(tmp_path_factory, small_text) -> dict:
    """What a run directory holding its first step takes: bytes of that step and inodes of the whole directory."""
    root = tmp_path_factory.mktemp("sizes")
    done = torchrun([*TRAIN, "--data", str(small_text), "--max-steps", "2", "--out", str(root / "run")], root / "home")
    assert done.returncode == 0, done.stderr[-4000:]
    run = root / "run"
    step_bytes = sum(p.stat().st_size for p in checkpoint.resolve(run).rglob("*") if p.is_file())
    entries = sum(1 for _ in run.rglob("*"))
    return {"step_bytes": step_bytes, "run_inodes": entries + 1, "step_inodes": sum(1 for _ in
                                                                                    checkpoint.resolve(run).rglob("*"))}


def losses_logged(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def assert_stopped_at_step_2(done: subprocess.CompletedProcess, run: Path, message: str) -> None:
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert any(message in line for line in ours), done.stderr[-4000:]
    assert any("rank 0 could not save the checkpoint" in line for line in ours)  # rank 1 stopped too, not hung
    assert "SafetensorError" not in done.stderr and "OSError" not in done.stderr
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["latest", "step-000002"]  # no temp dirs
    assert checkpoint.resolve(run) == run / "checkpoint" / "step-000002" and checkpoint.load(run).has_state()
    assert losses_logged(run) == [1, 2]


def test_too_few_bytes_for_the_next_step_stops_every_rank_before_writing(tmpfs, tmp_path, small_text,
                                                                         one_step_on_disk):
    disk = tmpfs(size=int(1.5 * one_step_on_disk["step_bytes"]) + (1 << 20), inodes=4096)
    run = disk / "run"
    done = torchrun([*TRAIN, "--data", str(small_text), "--out", str(run)], tmp_path / "home")
    assert_stopped_at_step_2(done, run, "not enough space to save a checkpoint")


def test_running_out_of_inodes_mid_save_is_the_kernels_enospc_in_one_line(tmpfs, tmp_path, small_text,
                                                                          one_step_on_disk):
    # room for the run with its first step, and for about half of the second step's files
    inodes = one_step_on_disk["run_inodes"] + one_step_on_disk["step_inodes"] // 2
    disk = tmpfs(size=64 << 20, inodes=inodes)
    run = disk / "run"
    done = torchrun([*TRAIN, "--data", str(small_text), "--out", str(run)], tmp_path / "home")
    assert_stopped_at_step_2(done, run, "No space left on device")
