"""`recurchat bench train` on the smoke preset: every JSON key present with sane values.

Run: `pytest tests/test_bench_train.py`."""

import json

import pytest

from recurchat.cli import main

KEYS = ("recursive_vs_unrolled_flops_ratio", "compiled_vs_eager_speedup", "mfu_recursive_compiled",
        "peak_flops", "peak_flops_source", "recompiles_after_warmup", "bptt_memory_ratio", "device", "dtype_chosen",
        "bf16_over_fp32_matmul", "optimizer_step_fraction")


@pytest.mark.slow
def test_bench_train_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--preset", "cpu-smoke", "--steps", "2", "--batch-size", "2",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in KEYS:
        assert key in res, key
    assert res["device"] == "cpu"
    assert res["peak_flops"] > 1e9 and res["peak_flops_source"] == "measured"
    # auto picks bf16 exactly where the probe measured it fast enough
    assert res["dtype_chosen"] == ("bf16" if res["bf16_over_fp32_matmul"] >= 1.2 else "fp32")
    assert 0 < res["optimizer_step_fraction"] < 1
    assert 0 < res["mfu_recursive_compiled"] < 1
    assert 0.1 < res["recursive_vs_unrolled_flops_ratio"] < 10
    # the headline ratios are the ratios of the cases reported next to them
    cases = {c["case"]: c for c in res["cases"]}
    eager, compiled = cases["recursive r=r̄ eager"], cases["recursive r=r̄ compiled"]
    assert res["compiled_vs_eager_speedup"] == pytest.approx(eager["step_s"] / compiled["step_s"])
    assert res["recursive_vs_unrolled_flops_ratio"] == pytest.approx(
        compiled["flops_s"] / cases["standard twin compiled"]["flops_s"])
    assert res["mfu_recursive_compiled"] == pytest.approx(compiled["mfu"])
    memory = res["bptt_memory_bytes"]
    assert res["bptt_memory_ratio"] == pytest.approx(memory["truncated"] / memory["full"])
    assert res["recompiles_after_warmup"] == 0 and res["distinct_r_after_warmup"] >= 8
    # k = r̄ at r = 4·r̄ keeps a quarter of the recurrent activations (plus prelude/coda): well under full
    assert 0 < res["bptt_memory_ratio"] < 0.75
