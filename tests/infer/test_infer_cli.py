"""sample / chat / eval --exit / bench infer on a real (smoke-trained) checkpoint.

Run: `pytest tests/infer/test_infer_cli.py`.
"""

import json

import pytest
from support import smoke_run

from recurchat.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_text):
    return smoke_run(tmp_path_factory.mktemp("runs"), small_text, steps=10)


def test_sample_fixed_and_exit(ckpt, capsys):
    assert main(["sample", "--ckpt", str(ckpt), "-p", "The", "--max-tokens", "12", "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("The") and "mean recursion depth 2.00" in cap.err
    assert main(["sample", "--ckpt", str(ckpt), "-p", "The", "--max-tokens", "12", "--exit", "latent:1e9",
                 "--max-recur", "6", "--kv", "last"]) == 0
    assert "mean recursion depth" in capsys.readouterr().err


def test_sample_speculative_greedy_and_sampled(ckpt, capsys):
    assert main(["sample", "--ckpt", str(ckpt), "-p", "The", "--max-tokens", "12", "--temperature", "0",
                 "--dtype", "fp32"]) == 0
    plain = capsys.readouterr().out
    assert main(["sample", "--ckpt", str(ckpt), "-p", "The", "--max-tokens", "12", "--temperature", "0",
                 "--speculate", "1:3", "--dtype", "fp32"]) == 0
    cap = capsys.readouterr()
    assert cap.out == plain and "verification passes" in cap.err
    assert main(["sample", "--ckpt", str(ckpt), "-p", "The", "--max-tokens", "6", "--temperature", "0.9",
                 "--speculate", "1:2", "--num-samples", "3"]) == 0
    assert capsys.readouterr().err.count("verification passes") == 3
    assert main(["sample", "--ckpt", str(ckpt), "--speculate", "1:2", "--exit", "kl:0.1"]) == 2
    assert "drop --exit" in capsys.readouterr().err


def test_chat_one_shot_and_interactive(ckpt, capsys, monkeypatch):
    assert main(["chat", "--ckpt", str(ckpt), "-p", "hello", "--max-tokens", "8", "--exit", "kl:0.5"]) == 0
    assert "mean recursion depth" in capsys.readouterr().err
    lines = iter(["hi there", "and again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--ckpt", str(ckpt), "--max-tokens", "5", "--recur", "3", "--warm-start"]) == 0
    assert capsys.readouterr().err.count("mean recursion depth 3.00") == 2


def test_generation_bad_input(ckpt, capsys):
    assert main(["sample", "--ckpt", str(ckpt), "--recur", "2", "--exit", "kl:1"]) == 2
    assert main(["sample", "--ckpt", str(ckpt), "--exit", "kl"]) == 2
    assert main(["sample", "--ckpt", str(ckpt), "--kv", "ring:x"]) == 2
    assert main(["sample", "--ckpt", str(ckpt), "-p", "word " * 100]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error:") for line in err)


def test_eval_with_exit(ckpt, tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", "--ckpt", str(ckpt), "--recur", "1,2", "--exit", "fixed:4,kl:1e-9,latent:1e9",
                 "--max-recur", "4", "--eval-tokens", "256", "--dtype", "fp32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["bpb"]) == {"1", "2"}
    ex = res["exit"]
    assert ex["latent:1e9"]["mean_recursions"] < ex["fixed:4"]["mean_recursions"] <= 4
    assert ex["kl:1e-9"]["mean_recursions"] > ex["latent:1e9"]["mean_recursions"]
    # latent:1e9 stops every token at its first check (iteration 2), and the prefill runs at r̄ = 2: the cached,
    # teacher-forced exit path then scores exactly what the uncached forward at r = 2 does
    assert ex["latent:1e9"]["mean_recursions"] == 2.0
    assert ex["latent:1e9"]["bpb"] == pytest.approx(res["bpb"]["2"], rel=1e-6)
    assert ex["latent:1e9"]["bpb"] != pytest.approx(res["bpb"]["1"], rel=1e-5)  # (r barely matters after 10 steps)


@pytest.mark.slow
def test_bench_infer_json(ckpt, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "infer", "--ckpt", str(ckpt), "--preset", "cpu-smoke", "--tokens", "24",
                 "--eval-tokens", "128", "--sweep", "kl:0.1", "--dtype", "fp32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("decode_tok_s_b1", "decode_tok_s_b8", "exit_mean_recursions", "fixed_recursions", "exit_bpb_delta",
                "exit_speedup_vs_predicted", "exit_speedup_b1", "exit_speedup_b8", "cached_over_naive_b1",
                "speculative_speedup_b1", "speculative_speedup_b8", "speculative_acceptance",
                "speculative_sampling_speedup_b1", "speculative_sampling_acceptance", "kv_bytes_per_token"):
        assert key in res, key
    assert not any(key.startswith("exit_calibrated_") for key in res)  # kl:3e-2 was given, not calibrated
    # fp32: speculation gives exactly the fixed-depth greedy tokens (bf16 may round a near-tie the other way)
    assert res["speculative_greedy_identical"] is True and res["speculative_first_difference"] is None
    assert 0 <= res["speculative_acceptance"] <= 1 and 0 <= res["speculative_sampling_acceptance"] <= 1
    # the default 1:6 emits between 1 and K + 1 = 7 tokens a round, and the ceiling scales the measured speedup to 7
    assert 1 <= res["speculative_tokens_per_round_b1"] <= 7
    assert res["speculative_ceiling_b1"] == pytest.approx(res["speculative_speedup_b1"] * 7
                                                          / res["speculative_tokens_per_round_b1"])
    assert 1 <= res["exit_mean_recursions"] <= 8
    # each ratio is the ratio of the rates it names, measured in this run
    assert res["cached_over_naive_b1"] == pytest.approx(res["decode_tok_s_b1"] / res["naive_tok_s_b1"])
    assert res["exit_speedup_b1"] == pytest.approx(res["decode_tok_s_b1_exit"] / res["decode_tok_s_b1"])
    assert res["decode_b8_of_flop_limit"] == pytest.approx(res["decode_tok_s_b8"] / res["decode_flop_limit_tok_s"])
    # the roofline is the lower of the FLOP and the bandwidth limit at that batch
    for rows in (1, 8):
        roofline = min(res["decode_flop_limit_tok_s"], res[f"decode_bandwidth_limit_tok_s_b{rows}"])
        assert res[f"decode_b{rows}_of_roofline"] == pytest.approx(res[f"decode_tok_s_b{rows}"] / roofline)
    assert res["compiled"] is False
    assert res["kv_bytes_per_token"]["last"] < res["kv_bytes_per_token"]["full"]
    # 8 prompts × 24 tokens each (no stop token at temperature 0): the measured speedup is the ratio of tok/s, and
    # the reported figure is measured / predicted
    assert res["exit_speedup_measured"] == pytest.approx(res["decode_tok_s_b8_exit"] / res["decode_tok_s_b8"])
    assert res["exit_speedup_vs_predicted"] == pytest.approx(res["exit_speedup_measured"]
                                                             / res["exit_speedup_predicted"])
    assert res["pareto"]
