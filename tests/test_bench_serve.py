"""`recurchat bench serve`: a seeded mixed workload, latency percentiles from arrival times, and both modes measured
through real `recurchat serve` processes. Run: `pytest tests/test_bench_serve.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import smoke_run

from recurchat.bench.serve import Sample, summarize, workload
from recurchat.cli import main


def test_the_workload_is_seeded_poisson_and_mixed():
    tokens = np.arange(1000, dtype=np.uint16)
    items = workload(tokens, 400, rate=10.0, rbar=4, exit_spec="kl:0.03")
    assert items == workload(tokens, 400, rate=10.0, rbar=4, exit_spec="kl:0.03")
    gaps = np.diff([0.0] + [it["at"] for it in items])
    assert np.all(gaps > 0) and abs(gaps.mean() - 0.1) < 0.02 and abs(gaps.std() - 0.1) < 0.03  # exponential
    bodies = [it["body"] for it in items]
    assert {len(b["prompt"]) for b in bodies} == {8, 32, 96} and {b["max_tokens"] for b in bodies} == {16, 64, 128}
    assert {json.dumps(b["recursion"]) for b in bodies} == {'{"num_recur": 4}', '{"num_recur": 2}',
                                                             '{"exit": "kl:0.03"}'}
    assert all(b["stream"] and b["return_depths"] and b["prompt"][1] == b["prompt"][0] + 1 for b in bodies)


def test_summary_measures_first_token_gaps_and_throughput():
    samples = [Sample(0.0, [0.5, 0.6, 0.8], [2, 4, 4]), Sample(1.0, [1.1, 1.2], [1, 1])]
    row = summarize(samples, wall=2.0)
    assert row["tokens"] == 5 and row["throughput_tok_s"] == 2.5 and row["mean_depth"] == 12 / 5
    assert row["ttft_p50_s"] == pytest.approx(0.3) and row["ttft_p99_s"] == pytest.approx(0.1 + 0.4 * 0.99)
    assert row["itl_p50_s"] == pytest.approx(0.1) and row["itl_p99_s"] == pytest.approx(0.2, abs=0.003)


def test_bench_serve_runs_both_modes_through_the_http_api(tmp_path, small_text):
    run = smoke_run(tmp_path, small_text)
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--ckpt", str(run), "--requests", "6", "--rate", "40", "--clients", "3",
                 "--max-batch", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    expected = sum(it["body"]["max_tokens"] for it in workload(np.zeros(200, dtype=np.uint16), 6, 40.0, 2, "x", 64))
    for mode in ("static", "continuous"):
        row = res[mode]
        assert row["requests"] == 6 and row["tokens"] == expected  # ignore_eos: every request runs to max_tokens
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and 0 < row["itl_p50_s"] <= row["itl_p99_s"]
        assert 1 <= row["mean_depth"] <= 8
    assert res["ttft_p99_ratio"] == pytest.approx(res["continuous"]["ttft_p99_s"] / res["static"]["ttft_p99_s"])
    assert main(["bench", "serve", "--ckpt", str(run), "--batching", "dynamic"]) == 2
