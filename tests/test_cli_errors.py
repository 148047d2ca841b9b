"""Bad input: one line naming the problem, exit code 2, nothing overwritten. Run: `pytest tests/test_cli_errors.py`."""

import json
import subprocess
import sys

import pytest

from recurchat import checkpoint
from recurchat.cli import main

SMOKE = ["--preset", "cpu-smoke", "--quiet"]


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text):
    out = tmp_path_factory.mktemp("runs") / "ok"
    assert main(["train", *SMOKE, "--data", str(small_text), "--out", str(out), "--max-steps", "2"]) == 0
    return out


@pytest.mark.parametrize("extra,needle", [
    (["--preset", "nope"], "unknown preset"),
    (["--r-max", "0"], "r_max"),
    (["--bptt-k", "0"], "bptt_k"),
    (["--vocab-size", "100"], "vocab"),
    (["--adapter", "mul"], "adapter"),
    (["--recur-dist", "uniform"], "depth distribution"),
    (["--total-batch-tokens", "100"], "total_batch_tokens"),
])
def test_bad_train_config(tmp_path, small_text, capsys, extra, needle):
    out = tmp_path / "run"
    code, err = run_cli(["train", *SMOKE, "--data", str(small_text), "--out", str(out), "--max-steps", "1", *extra],
                        capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (out / "checkpoint").exists()


def test_missing_and_empty_data(tmp_path, capsys):
    code, err = run_cli(["train", *SMOKE, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r")],
                        capsys)
    assert code == 2 and "missing.txt" in err[0]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    code, err = run_cli(["train", *SMOKE, "--data", str(empty), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "empty" in err[0].lower()


def test_corrupt_and_foreign_checkpoints(tmp_path, trained, capsys):
    import shutil
    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint.resolve(trained), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    code, err = run_cli(["eval", "--ckpt", str(corrupt), "--recur", "1"], capsys)
    assert code == 2 and "is damaged: model.safetensors" in err[0]  # its manifest catches it first
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = run_cli(["eval", "--ckpt", str(foreign)], capsys)
    assert code == 2 and "not a recurchat checkpoint" in err[0]
    code, err = run_cli(["eval", "--ckpt", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err[0]


def test_resume_with_mismatched_config_overwrites_nothing(trained, capsys):
    before = (checkpoint.resolve(trained) / "model.safetensors").read_bytes()
    code, err = run_cli(["train", "--quiet", "--resume", str(trained), "--out", str(trained), "--d-model", "128"],
                        capsys)
    assert code == 2 and "d_model" in err[0]
    assert (checkpoint.resolve(trained) / "model.safetensors").read_bytes() == before


def test_existing_run_needs_resume_or_overwrite(trained, small_text, capsys):
    code, err = run_cli(["train", *SMOKE, "--data", str(small_text), "--out", str(trained), "--max-steps", "1"],
                        capsys)
    assert code == 2 and "--resume" in err[0]


def test_eval_bad_tasks_and_recur(trained, capsys):
    code, err = run_cli(["eval", "--ckpt", str(trained), "--tasks", "bpb,nope"], capsys)
    assert code == 2 and "nope" in err[0]
    code, err = run_cli(["eval", "--ckpt", str(trained), "--recur", "1,x"], capsys)
    assert code == 2 and "1,x" in err[0]


def test_python_dash_m_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "recurchat", "train", "--preset", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: unknown preset 'nope' (choose from "
                                                                   "cpu-smoke, cpu-tiny, probe, gpu-d20)"]
