"""Checkpoints: save → load round trip, run dir or checkpoint dir, load_model (eval mode, same logits), old configs
with n_recur, resumable optimizer state, corrupt or foreign directories (UserError, never a traceback), and no temp
directories left behind.

Run: `pytest tests/test_checkpoint.py`.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from support import random_model

from recurchat import checkpoint
from recurchat.config import TrainConfig
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.files import write_manifest
from recurchat.model.recurrent import RecurrentLM


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [f"sample {i}: the cat number {i * 7} sat on mat {i % 13}." for i in range(300)]
    return Tokenizer.train(texts, 320)


@pytest.fixture
def saved(tmp_path, tiny_cfg, tokenizer):
    """(run directory, the model saved in run/checkpoint)."""
    model = random_model(tiny_cfg, seed=4)
    run = tmp_path / "run"
    checkpoint.save(run / "checkpoint", model, tiny_cfg, TrainConfig(seed=3, max_steps=7), tokenizer)
    return run, model


def leftovers(directory):
    """Hidden entries (temporary or old checkpoint directories) anywhere under `directory`."""
    return [p for p in directory.rglob(".*")]


def logits(model, cfg, r):
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        return model(idx, num_recur=r)


# ---- round trip ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip(saved, tiny_cfg, tokenizer):
    run, model = saved
    ck_dir = run / "checkpoint"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "state",
                                                        "tokenizer.json"]
    config = json.loads((ck_dir / "config.json").read_text())
    assert config["format"] == "recurchat-checkpoint" and config["version"] == checkpoint.VERSION
    ck = checkpoint.load(ck_dir)
    assert ck.path == ck_dir
    assert ck.model_cfg == tiny_cfg and ck.train_cfg == TrainConfig(seed=3, max_steps=7)
    assert ck.tokenizer.fingerprint() == tokenizer.fingerprint()
    text = "the cat number 42 sat"
    assert ck.tokenizer.encode(text) == tokenizer.encode(text)
    state = model.state_dict()
    assert set(ck.weights) == set(state)
    assert all(torch.equal(ck.weights[k], state[k]) for k in state)
    assert not ck.has_state()  # no optimizers were given
    with pytest.raises(UserError, match="no resumable state"):
        checkpoint.load_train_state(ck, [])


def test_resolve_accepts_a_run_dir_and_its_checkpoint_dir(saved, tmp_path):
    run, _ = saved
    assert checkpoint.resolve(run) == run / "checkpoint"
    assert checkpoint.resolve(run / "checkpoint") == run / "checkpoint"
    assert checkpoint.resolve(str(run)) == run / "checkpoint"
    assert checkpoint.load(run).path == checkpoint.load(run / "checkpoint").path == run / "checkpoint"
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.resolve(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a recurchat checkpoint"):
        checkpoint.resolve(tmp_path / "empty")


def test_load_model_is_in_eval_mode_with_the_saved_logits(saved, tiny_cfg):
    run, model = saved
    ck, loaded = checkpoint.load_model(run, device="cpu")
    assert isinstance(loaded, RecurrentLM) and not loaded.training
    assert not any(m.training for m in loaded.modules())
    assert next(loaded.parameters()).device.type == "cpu"
    for r in (1, 3, 6):
        assert torch.equal(logits(loaded, tiny_cfg, r), logits(model, tiny_cfg, r))
    assert not torch.allclose(logits(loaded, tiny_cfg, 1), logits(loaded, tiny_cfg, 6))  # depth matters: a real check


def test_overwrite_replaces_the_checkpoint_and_leaves_no_temp_dirs(saved, tiny_cfg, tokenizer):
    run, _ = saved
    assert leftovers(run) == []
    other = random_model(tiny_cfg, seed=9)
    path = checkpoint.save(run / "checkpoint", other, tiny_cfg, TrainConfig(), tokenizer)
    assert path == run / "checkpoint"
    assert [p.name for p in run.iterdir()] == ["checkpoint"] and leftovers(run) == []
    _, loaded = checkpoint.load_model(run, device="cpu")
    assert torch.equal(logits(loaded, tiny_cfg, 2), logits(other, tiny_cfg, 2))


def test_old_config_with_n_recur_still_loads(saved, tiny_cfg):
    run, model = saved
    config_path = run / "checkpoint" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["n_recur"] = config["model"].pop("n_shared")  # how checkpoints before the rename spelled R
    config_path.write_text(json.dumps(config))
    write_manifest(run / "checkpoint")  # written that way (damage after writing: test_checkpoint_integrity.py)
    ck, loaded = checkpoint.load_model(run, device="cpu")
    assert ck.model_cfg == tiny_cfg and ck.model_cfg.n_shared == tiny_cfg.n_shared
    assert torch.equal(logits(loaded, tiny_cfg, 3), logits(model, tiny_cfg, 3))


def test_resumable_state_round_trip(tmp_path, tiny_cfg, tokenizer):
    model = random_model(tiny_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, tiny_cfg.vocab_size, (1, 8)), torch.randint(0, tiny_cfg.vocab_size, (1, 8))).backward()
    opt.step()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    path = checkpoint.save(tmp_path / "ck", model, tiny_cfg, TrainConfig(), tokenizer, [opt],
                           {"step": 5, "loader": {"pos": 17}})
    ck = checkpoint.load(path)
    assert ck.has_state()
    fresh_model = random_model(tiny_cfg)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    torch.manual_seed(0)  # load_train_state restores the RNG as it was at save time
    state = checkpoint.load_train_state(ck, [fresh])
    assert state == {"step": 5, "loader": {"pos": 17}}
    assert torch.equal(torch.get_rng_state(), rng)
    before, after = opt.state_dict(), fresh.state_dict()
    # (param groups come back through JSON: betas as a list, which torch accepts)
    assert json.loads(json.dumps(before["param_groups"])) == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for pid, s in before["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][pid][key])), (pid, key)
    with pytest.raises(UserError, match="does not match this run's optimizers"):
        checkpoint.load_train_state(ck, [torch.optim.SGD(fresh_model.parameters(), lr=0.1)])
    assert leftovers(tmp_path) == []


# ---- corrupt or foreign directories -------------------------------------------------------------------------------
def corrupt_config(text):
    def apply(ck_dir):
        (ck_dir / "config.json").write_text(text)
    return apply


def edit_config(edit):
    def apply(ck_dir):
        config = json.loads((ck_dir / "config.json").read_text())
        edit(config)
        (ck_dir / "config.json").write_text(json.dumps(config))
    return apply


def remove(name):
    def apply(ck_dir):
        (ck_dir / name).unlink()
    return apply


def overwrite(name, data: bytes):
    def apply(ck_dir):
        (ck_dir / name).write_bytes(data)
    return apply


def foreign_weights(ck_dir):
    save_file({"w": torch.zeros(2)}, str(ck_dir / "model.safetensors"))


def fewer_shared_blocks(config):
    config["model"]["n_shared"] = 1


CORRUPTIONS = [
    ("config not json", corrupt_config("{not json"), "is not valid JSON"),
    ("config a list", corrupt_config("[1, 2]"), "is not a recurchat checkpoint"),
    ("foreign config", corrupt_config('{"architectures": ["LlamaForCausalLM"]}'), "is not a recurchat checkpoint"),
    ("unknown field", edit_config(lambda c: c["model"].update(n_experts=8)), "unknown ModelConfig fields: n_experts"),
    ("invalid value", edit_config(lambda c: c["model"].update(mean_recur=99)), "mean_recur must be in"),
    ("no tokenizer", remove("tokenizer.json"), "has no tokenizer.json"),
    ("bad tokenizer", overwrite("tokenizer.json", b"{]"), "corrupt tokenizer file"),
    ("no weights", remove("model.safetensors"), "has no model.safetensors"),
    ("truncated weights", overwrite("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"), "is corrupt"),
    ("garbage weights", overwrite("model.safetensors", b"hello world, not tensors"), "is corrupt"),
    ("foreign weights", foreign_weights, "does not fit the model"),
    ("config for fewer blocks", edit_config(fewer_shared_blocks), "does not fit the model"),
]


@pytest.mark.parametrize("name, damage, message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_or_foreign_checkpoint_is_a_user_error(saved, name, damage, message):
    run, _ = saved
    damage(run / "checkpoint")
    # the manifest re-written: checkpoints written this way (by hand, by another tool) must still be caught by the
    # content checks; damage after writing is what test_checkpoint_integrity.py covers
    write_manifest(run / "checkpoint")
    with pytest.raises(UserError, match=message):
        checkpoint.load_model(run, device="cpu")


def test_config_with_other_dims_than_the_weights_is_a_user_error(saved):
    run, _ = saved
    edit_config(lambda c: c["model"].update(d_model=128))(run / "checkpoint")
    write_manifest(run / "checkpoint")
    with pytest.raises(UserError, match="does not describe its weights"):
        checkpoint.load_model(run, device="cpu")


def test_config_whose_model_entry_is_not_an_object_is_a_user_error(saved):
    run, _ = saved
    edit_config(lambda c: c.update(model=[1, 2]))(run / "checkpoint")
    write_manifest(run / "checkpoint")
    with pytest.raises(UserError, match="must be a JSON object"):
        checkpoint.load(run)


def test_a_failed_load_changes_nothing_on_disk(saved):
    run, _ = saved
    remove("tokenizer.json")(run / "checkpoint")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(UserError):
        checkpoint.load(run)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before and leftovers(run) == []



# ---- versioned checkpoints under crashes -------------------------------------------------------------------------
CRASHING_TRAIN = """
import os, signal, sys
import recurchat.checkpoint as ck
point, target = sys.argv[1], "step-000008"
real_replace, real_latest, real_prune = ck.os.replace, ck.atomic_write_text, ck.prune

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst):
    if point == "before-rename" and str(dst).endswith(target):
        die()
    real_replace(src, dst)
    if point == "after-rename" and str(dst).endswith(target):
        die()

def latest(path, text):
    real_latest(path, text)
    if point == "after-latest" and text.strip() == target:
        die()

ck.os.replace, ck.atomic_write_text = replace, latest
from recurchat.cli import main
sys.exit(main(sys.argv[2:]))
"""


def steps_logged(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.parametrize("point,resumes_from", [("before-rename", 4), ("after-rename", 8), ("after-latest", 8)])
def test_sigkill_during_a_checkpoint_write_resumes_from_the_newest_complete_step(tmp_path, small_text, point,
                                                                                   resumes_from):
    import subprocess
    import sys

    from recurchat.cli import main

    args = ["train", "--preset", "cpu-smoke", "--quiet", "--data", str(small_text), "--max-steps", "12",
            "--save-every", "4", "--eval-every", "0", "--dtype", "fp32", "--keep-checkpoints", "2"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main([*args, "--out", str(straight)]) == 0
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_TRAIN)
    proc = subprocess.run([sys.executable, str(script), point, *args, "--out", str(crashed)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    found = checkpoint.resolve(crashed)
    assert found.name == f"step-{resumes_from:06d}"
    assert json.loads((found / "state" / "trainer.json").read_text())["step"] == resumes_from
    assert main(["train", "--quiet", "--resume", str(crashed), "--out", str(crashed)]) == 0
    assert steps_logged(crashed) == list(range(1, 13))  # each step once
    assert [json.loads(line)["loss"] for line in (crashed / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line] == [json.loads(line)["loss"] for line in
                                     (straight / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    kept = sorted(p.name for p in (crashed / "checkpoint").glob("step-*"))
    assert kept == ["step-000008", "step-000012"]  # the newest two
    assert (crashed / "checkpoint" / "latest").read_text().strip() == "step-000012"


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, small_text):
    from recurchat.cli import main

    run = tmp_path / "run"
    common = ["train", "--preset", "cpu-smoke", "--quiet", "--data", str(small_text), "--eval-every", "0",
              "--out", str(run)]
    assert main([*common, "--max-steps", "6"]) == 0
    assert main([*common, "--max-steps", "2", "--overwrite", "--stop-after", "1", "--save-every", "0"]) == 0
    # stop_after ends the invocation with a checkpoint at step 1: the old run's step 6 is gone only now
    assert sorted(p.name for p in (run / "checkpoint").glob("step-*")) == ["step-000001"]


def test_save_every_min_checkpoints_when_the_minutes_have_passed(tmp_path, small_text, monkeypatch):
    """A clock that moves one minute per reading: with --save-every-min 2, every second step is two minutes on."""
    import itertools

    import recurchat.train.trainer as trainer
    from recurchat.cli import main

    minutes = itertools.count()
    monkeypatch.setattr(trainer, "monotonic", lambda: 60.0 * next(minutes))
    run = tmp_path / "run"
    assert main(["train", "--preset", "cpu-smoke", "--quiet", "--data", str(small_text), "--eval-every", "0",
                 "--max-steps", "7", "--save-every", "0", "--save-every-min", "2", "--keep-checkpoints", "10",
                 "--out", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoint").glob("step-*")) == [
        "step-000002", "step-000004", "step-000006", "step-000007"]
