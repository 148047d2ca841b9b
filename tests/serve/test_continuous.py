"""The continuous scheduler behind a live server: a request that arrives while another streams is answered before
that one ends (a static batch makes it wait), requests with different recursion settings share steps and answer as
they would alone, and the KV budget sizes the row pool. Fixtures: conftest.py.
Run: `pytest tests/serve/test_continuous.py`.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_support import SLOW, SLOW_R

from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams
from recurchat.serve.server import create_app, start_in_thread

SHORT = {"model": "smoke", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def overtakes(bundle, batching: str) -> int:
    """Stream a slow request; once its first chunk is in, send a short one. Returns how many of the slow request's
    chunks arrived after the short one was answered."""
    srv = start_in_thread(create_app(bundle, batching=batching, max_recur_limit=SLOW_R))
    arrivals: list[float] = []
    started = threading.Event()

    def read_slow() -> None:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**SLOW, "stream": True}, timeout=120) as slow:
            for line in slow.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.perf_counter())
                    started.set()

    try:
        reader = threading.Thread(target=read_slow)
        reader.start()
        assert started.wait(60)
        short = httpx.post(f"{srv.url}/v1/completions", json=SHORT, timeout=120)
        answered = time.perf_counter()
        reader.join(120)
    finally:
        srv.stop()
    assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] == "length"
    return sum(1 for t in arrivals if t > answered)


def test_a_request_arriving_mid_stream_is_answered_before_the_running_one_ends(bundle):
    after = overtakes(bundle, "continuous")
    assert after > 5, after  # the slow request streamed on after the short one was answered
    after = overtakes(bundle, "static")
    assert after <= 1, after  # a static batch runs to its end first (at most the closing [DONE] comes later)


def test_rows_with_different_recursion_settings_share_steps_and_answer_as_alone(bundle):
    settings = [{"num_recur": 1}, {"num_recur": 3}, {"exit": "kl:0.01", "max_recur": 6},
                {"exit": "latent:0.05", "max_recur": 5, "min_recur": 2}, {"num_recur": 2, "warm_start": True}]
    prompts = [[5, 9, 2, 7], [11, 3], [1, 2, 3, 4, 5, 6], [8], [40, 41, 42]]
    srv = start_in_thread(create_app(bundle, max_batch=8))
    replies: dict[int, dict] = {}
    # all five arrive together, and each reply takes far longer than their arrival spread, so they share one pool
    # (with 12 tokens a fast fp32 decode finished the first reply before the last request came, and a second pool
    # was made: timing, not the scheduler)
    together, tokens = threading.Barrier(len(prompts)), 40

    def ask(i: int) -> None:
        body = {"model": "smoke", "prompt": prompts[i], "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "recursion": settings[i], "return_depths": True}
        together.wait(30)
        replies[i] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for _ in range(100):  # the engine thread drops the idle pool just after the last reply's step
            health = httpx.get(f"{srv.url}/health").json()["scheduler"]
            if health["pools_live"] == 0:
                break
            time.sleep(0.02)
    finally:
        srv.stop()
    ckpt, model = bundle
    engine = Engine(model, dtype=create_app(bundle).state.service.engine.dtype.name)
    tok = ckpt.tokenizer
    for i, recur in enumerate(settings):
        alone = engine.generate([prompts[i]], SamplingParams(max_tokens=tokens, temperature=0.0),
                                RecurParams(**recur))[0]
        assert replies[i]["choices"][0]["text"] == tok.decode(alone.tokens), recur
        assert replies[i]["choices"][0]["depths"] == alone.depths, recur
    assert health["pools_created"] == 1 and health["steps"] < tokens * len(prompts)  # shared steps, one pool
    # every reply is in: the pool went idle and was dropped, and /health says so (nothing live, no KV held)
    assert health["pools_live"] == 0 and health["kv_bytes_running"] == 0


@pytest.mark.parametrize("rows", [1, 2])
def test_the_kv_budget_sizes_the_row_pool_and_refuses_what_cannot_fit(bundle, rows):
    app = create_app(bundle, max_batch=8)
    scheduler = app.state.service.scheduler
    cfg = app.state.service.cfg
    row = scheduler.row_bytes("full", 8 if cfg.r_max <= 8 else cfg.r_max)
    app = create_app(bundle, max_batch=8, kv_budget_mb=(rows + 0.5) * row / 2**20)
    srv = start_in_thread(app)
    try:
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(httpx.post(
            f"{srv.url}/v1/completions", json={**SHORT, "max_tokens": 8}, timeout=60).status_code)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        deep = httpx.post(f"{srv.url}/v1/completions", json={**SHORT, "recursion": {"num_recur": 4 * cfg.r_max}},
                          timeout=60)
        health = httpx.get(f"{srv.url}/health").json()["scheduler"]
    finally:
        srv.stop()
    assert codes == [200] * 5
    assert health["kv_bytes_peak"] == rows * row <= health["kv_budget_bytes"]
    assert deep.status_code == 400 and "KV budget" in deep.json()["error"]["message"]
    assert health["too_large"] == 1
