"""Checkpoints a user can trust: a manifest per step, verified on load; a damaged newest step is skipped (and
--resume continues exactly from the older one); NaN weights are refused; a full disk is one line with the previous
step intact; `recurchat checkpoint verify`. Run: `pytest tests/test_checkpoint_integrity.py`.
"""

import errno
import json

import pytest
from safetensors.torch import load_file, save_file

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.files import MANIFEST_FILE

COMMON = ["train", "--preset", "cpu-smoke", "--quiet", "--eval-every", "0", "--dtype", "fp32", "--save-every", "2",
          "--keep-checkpoints", "2"]


@pytest.fixture
def run(tmp_path, small_text):
    """A cpu-smoke run with steps 2 and 4 kept."""
    out = tmp_path / "run"
    assert main([*COMMON, "--data", str(small_text), "--max-steps", "4", "--out", str(out)]) == 0
    return out


def losses_logged(run) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def step(run, n):
    return run / "checkpoint" / f"step-{n:06d}"


def flip_a_byte(path, offset_from_end=4096):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_step_has_a_manifest_of_its_files(run):
    manifest = json.loads((step(run, 4) / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json",
                                      "state/optimizer.safetensors", "state/trainer.json"}
    assert manifest["hash"] == "sha256" and all(len(e["sha256"]) == 64 for e in manifest["files"].values())


@pytest.mark.parametrize("damage, reason", [
    (lambda p: flip_a_byte(p / "model.safetensors"), "model.safetensors does not match its sha256"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
     "model.safetensors is"),
])
def test_a_damaged_newest_step_is_skipped_with_one_line(run, capsys, damage, reason):
    damage(step(run, 4))
    capsys.readouterr()
    assert checkpoint.resolve(run) == step(run, 2)
    err = capsys.readouterr().err
    assert "skipping" in err and reason in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--ckpt", str(step(run, 4)), "--tasks", "bpb", "--eval-tokens", "128", "--quiet"]) == 2
    assert f"checkpoint {step(run, 4)} is damaged: {reason}" in capsys.readouterr().err
    assert main(["checkpoint", "verify", str(run)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "DAMAGED" in lines[0] and reason in lines[0] and " ok " in lines[1]


def test_verify_passes_a_sound_run_and_names_a_step_without_manifest(run, capsys):
    assert main(["checkpoint", "verify", str(run)]) == 0
    assert all(" ok " in line for line in capsys.readouterr().out.strip().splitlines())
    (step(run, 4) / MANIFEST_FILE).unlink()
    assert checkpoint.load(run).path == step(run, 4)  # written before manifests: loads, with a note
    assert "has no manifest" in capsys.readouterr().err
    assert main(["checkpoint", "verify", str(step(run, 4))]) == 0
    assert "unverified" in capsys.readouterr().out


def test_nan_weights_are_refused(run, capsys):
    target = step(run, 4)
    weights = load_file(str(target / "model.safetensors"))
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, str(target / "model.safetensors"))
    (target / MANIFEST_FILE).unlink()  # a consistent step whose weights are bad
    assert main(["eval", "--ckpt", str(target), "--tasks", "bpb", "--eval-tokens", "128", "--quiet"]) == 2
    assert "holds NaN or Inf" in capsys.readouterr().err


def test_resume_after_losing_the_newest_step_continues_exactly_from_the_older_one(tmp_path, small_text, run):
    straight = tmp_path / "straight"
    assert main([*COMMON, "--data", str(small_text), "--max-steps", "6", "--out", str(straight)]) == 0
    flip_a_byte(step(run, 4) / "state" / "optimizer.safetensors")
    assert main(["train", "--quiet", "--resume", str(run), "--out", str(run), "--max-steps", "6"]) == 0
    ours, theirs = load_file(str(step(run, 6) / "model.safetensors")), load_file(str(step(straight, 6) /
                                                                                     "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)  # bit for bit, fp32
    assert losses_logged(run) == [1, 2, 3, 4, 5, 6]  # steps 3-4 logged once, from the rerun


def test_a_full_disk_mid_save_is_one_line_and_leaves_the_previous_step(tmp_path, small_text, capsys, monkeypatch):
    out = tmp_path / "run"
    real = checkpoint.save_file
    calls = {"n": 0}

    def fill_the_disk(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # step 2 (weights, optimizer) fits; step 4 finds the disk full halfway
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", fill_the_disk)
    assert main([*COMMON, "--data", str(small_text), "--max-steps", "6", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "MB needed" in err[0] and "MB free" in err[0]
    assert "previous checkpoint is intact" in err[0]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["latest", "step-000002"]  # no temp dirs
    assert checkpoint.resolve(out) == step(out, 2) and checkpoint.load(out).has_state()
    assert losses_logged(out) == [1, 2]  # consistent with the last good step


def test_too_little_free_space_is_said_before_writing(run, capsys, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert main(["train", "--quiet", "--resume", str(run), "--out", str(run), "--max-steps", "6"]) == 2
    assert "not enough space to save a checkpoint" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in (run / "checkpoint").iterdir())
