"""`recurchat sft`: builtin tasks and JSONL conversations on the shared trainer; exact resume; bad input.

Run: `pytest tests/train/test_sft.py`.
"""

import json

import pytest

from recurchat import checkpoint
from recurchat.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_text):
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", "--preset", "cpu-smoke", "--quiet", "--data", str(small_text), "--out", str(out),
                 "--max-steps", "4"]) == 0
    return out


def losses(run):
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


def test_sft_builtin_tasks_and_exact_resume(base, tmp_path):
    common = ["sft", "--ckpt", str(base), "--quiet", "--data", "builtin:hops,arith", "--sft-examples", "64",
              "--max-steps", "6", "--eval-every", "3", "--dtype", "fp32"]
    straight, split = tmp_path / "a", tmp_path / "b"
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--out", str(split), "--stop-after", "3"]) == 0
    assert main(["sft", "--quiet", "--resume", str(split), "--out", str(split)]) == 0
    assert losses(straight) == losses(split) and sorted(losses(split)) == list(range(1, 7))
    ck = checkpoint.load(straight)
    assert ck.train_cfg.data == "builtin:hops,arith"
    assert ck.tokenizer.fingerprint() == checkpoint.load(base).tokenizer.fingerprint()


def test_sft_jsonl(base, tmp_path):
    data = tmp_path / "chat.jsonl"
    convs = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
             for i in range(40)]
    data.write_text("\n".join(json.dumps(c) for c in convs))
    assert main(["sft", "--ckpt", str(base), "--quiet", "--data", str(data), "--out", str(tmp_path / "s"),
                 "--max-steps", "2"]) == 0
    assert (checkpoint.resolve(tmp_path / "s") / "model.safetensors").is_file()


def test_sft_bad_input(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for data in (str(bad), "builtin:nope", str(tmp_path / "missing.jsonl")):
        assert main(["sft", "--ckpt", str(base), "--quiet", "--data", data, "--out", str(tmp_path / "x")]) == 2
    assert main(["sft", "--quiet", "--data", "builtin:hops", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "bad.jsonl:1" in err[0] and "nope" in err[1] and "missing.jsonl" in err[2]
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_sft_reports_plain_text_bpb_on_the_base_pretraining_text(base, tmp_path, small_text):
    out = tmp_path / "plain"
    assert main(["sft", "--ckpt", str(base), "--quiet", "--data", "builtin:chain:1-4", "--sft-examples", "32",
                 "--max-steps", "2", "--eval-recur", "2", "--out", str(out)]) == 0
    assert checkpoint.load(out).train_cfg.pretrain_data == str(small_text)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "val_bpb_text" in r][-1]
    # the same number `recurchat eval --tasks bpb` gives for the fine-tuned checkpoint on that text
    result = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(out), "--tasks", "bpb", "--recur", "2", "--data", str(small_text),
                 "--eval-tokens", str(checkpoint.load(out).train_cfg.eval_tokens), "--json", str(result),
                 "--quiet"]) == 0
    assert logged["val_bpb_text"]["2"] == pytest.approx(json.loads(result.read_text())["tasks"]["bpb"]["2"], rel=1e-5)


def test_sft_defaults_lower_the_learning_rates_and_warm_up(base, tmp_path):
    from recurchat.train.spec import SFT_LR_FRAC, sft_spec

    pre = checkpoint.load(base).train_cfg
    spec = sft_spec(base, tmp_path / "a", train={"data": "builtin:hops"})
    for name in ("lr_matrix", "lr_embed", "lr_head", "lr_scalar"):
        assert getattr(spec.train, name) == pytest.approx(getattr(pre, name) * SFT_LR_FRAC)
    assert spec.train.warmup_steps == spec.train.max_steps // 10 == 30
    short = sft_spec(base, tmp_path / "c", train={"data": "builtin:hops", "max_steps": 20})
    assert short.train.warmup_steps == 2  # a tenth of the schedule, whatever its length
    assert sft_spec(base, tmp_path / "b", train={"data": "builtin:hops", "lr_matrix": 0.5}).train.lr_matrix == 0.5


def test_mix_pretrain_trains_some_steps_on_text_and_resumes_exactly(base, tmp_path):
    common = ["sft", "--ckpt", str(base), "--quiet", "--data", "builtin:hops", "--sft-examples", "64",
              "--max-steps", "8", "--eval-every", "0", "--dtype", "fp32", "--mix-pretrain", "0.5"]
    straight, split = tmp_path / "a", tmp_path / "b"
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--out", str(split), "--stop-after", "4"]) == 0
    assert main(["sft", "--quiet", "--resume", str(split), "--out", str(split)]) == 0
    assert losses(straight) == losses(split) and sorted(losses(split)) == list(range(1, 9))
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    on_text = [r["text_batches"] for r in records if "loss" in r]
    assert 0 < sum(on_text) < len(on_text)  # one micro-step per step here: some steps on text, some on chats
    assert checkpoint.load(straight).train_cfg.mix_pretrain == 0.5


def test_mix_pretrain_is_refused_outside_sft(tmp_path, small_text, capsys):
    assert main(["train", "--preset", "cpu-smoke", "--quiet", "--data", str(small_text), "--out", str(tmp_path / "x"),
                 "--max-steps", "2", "--mix-pretrain", "0.5"]) == 2
    assert "mix_pretrain" in capsys.readouterr().err


def test_sft_of_a_base_whose_text_is_gone_trains_without_plain_text_bpb(tmp_path, small_text, capsys):
    text = tmp_path / "gone.txt"
    text.write_text(small_text.read_text()[:60_000])
    base = tmp_path / "base"
    assert main(["train", "--preset", "cpu-smoke", "--quiet", "--data", str(text), "--out", str(base),
                 "--max-steps", "2"]) == 0
    text.unlink()
    out = tmp_path / "sft"
    args = ["sft", "--ckpt", str(base), "--quiet", "--data", "builtin:hops", "--sft-examples", "32",
            "--max-steps", "2", "--out", str(out)]
    assert main(args) == 0
    assert "no plain-text val bpb during SFT" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in r for r in records) and not any("val_bpb_text" in r for r in records)
    assert main([*args[:-1], str(tmp_path / "mixed"), "--mix-pretrain", "0.5"]) == 2
    assert "--mix-pretrain needs the base's pretraining text" in capsys.readouterr().err
