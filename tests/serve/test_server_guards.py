"""The live server failing loudly and guarding its limits: engine errors as logged 500s, 415, the env API key,
per-request RNGs, the KV budget, and chat replies that end at special tokens. Fixtures: conftest.py.

Run: `pytest tests/serve/test_server_guards.py`.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch
from server_support import HELLO, stats

from recurchat.checkpoint import load_model
from recurchat.serve.server import create_app, start_in_thread


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_engine_failure_is_a_500_with_the_traceback_in_the_log(bundle, monkeypatch, caplog, batching):
    app = create_app(bundle, batching=batching)
    srv = start_in_thread(app)
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("boom: an engine bug")

        monkeypatch.setattr(app.state.service.engine.runner, "chunk", broken)  # the prefill, in either scheduler
        with httpx.Client(base_url=srv.url, timeout=60) as http, caplog.at_level("ERROR", "recurchat.server"):
            r = http.post("/v1/chat/completions", json={"model": "smoke", "messages": HELLO, "max_tokens": 3})
            health = http.get("/health").json()["scheduler"]
    finally:
        srv.stop()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "boom" not in r.text  # the internal message stays in the log
    assert any("boom: an engine bug" in (rec.exc_text or "") for rec in caplog.records), caplog.text
    assert health["failed"] == 1


def test_non_json_content_type_is_415(http):
    body = json.dumps({"model": "smoke", "messages": HELLO, "max_tokens": 3})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        r = http.post("/v1/chat/completions", content=body, headers={} if ctype is None else {"Content-Type": ctype})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (ctype, r.text)
    assert stats(http)["failed"] == 0


def test_api_key_from_the_environment_guards_all_but_the_page_and_health(bundle, monkeypatch):
    monkeypatch.setenv("RECURCHAT_API_KEY", "from-env")
    srv = start_in_thread(create_app(bundle))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
            # the API's docs need the key too; the chat page's files and the health check do not
            assert [http.get(p).status_code for p in ("/docs", "/openapi.json")] == [401, 401]
            assert [http.get(p).status_code for p in ("/", "/web/app.js", "/health")] == [200, 200, 200]
    finally:
        srv.stop()


def test_requests_without_a_seed_leave_the_global_rng_alone(client):
    import torch

    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    client.chat.completions.create(model="smoke", messages=HELLO, max_tokens=3, temperature=1.0)
    assert torch.equal(torch.rand(3), expected)


def test_kv_budget_refuses_what_can_never_fit_and_batches_within_it(bundle, monkeypatch):
    """Room for two rows of this request's cache: six at once all finish, in batches of at most two, and no cache
    the engine allocates is larger than the budget; a request whose cache alone is too large gets a 400."""
    import recurchat.infer.batcher as engine_module  # where the engine allocates its caches
    from recurchat.infer.engine import RecurParams

    allocated: list[int] = []

    class Recording(engine_module.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            allocated.append(self.nbytes())

    body = {"model": "smoke", "prompt": [1, 2, 3], "max_tokens": 20, "recursion": {"num_recur": 4}}
    app = create_app(bundle, max_batch=8)
    one_row = app.state.service.engine.cache_bytes([3 + 20], RecurParams(num_recur=4))
    budget_mb = 2.5 * one_row / 2**20
    app = create_app(bundle, max_batch=8, kv_budget_mb=budget_mb, batching="static")
    monkeypatch.setattr(engine_module, "KVCache", Recording)
    srv = start_in_thread(app)
    try:
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(
            httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).status_code)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        too_big = httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 60}, timeout=60)
        health = httpx.get(f"{srv.url}/health").json()["scheduler"]
    finally:
        srv.stop()
    assert codes == [200] * 6
    assert allocated and max(allocated) <= budget_mb * 2**20 and 2 * one_row in allocated, (allocated, one_row)
    assert health["kv_bytes_peak"] <= health["kv_budget_bytes"] and health["kv_bytes_running"] == 0
    assert health["too_large"] == 1 and health["rejected"] == 0
    assert too_big.status_code == 400
    error = too_big.json()["error"]
    assert error["code"] == "kv_budget_exceeded" and error["param"] == "max_tokens"
    assert "KV budget" in error["message"] and "MiB" in error["message"]


def test_a_chat_reply_ends_at_any_special_token_and_never_shows_one(bundle):
    """Head rigged so the first token is <|user_start|> or <|system_start|> (whichever the sign of one dot product
    favours; every other logit is 0): the reply is empty and stops there instead of showing the token."""
    ckpt, _ = bundle
    _, model = load_model(str(ckpt.path), "cpu")
    tok = ckpt.tokenizer
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.special_id("user_start")] = 5 * v
        model.lm_head.weight[tok.special_id("system_start")] = -5 * v
    srv = start_in_thread(create_app((ckpt, model)))
    try:
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                       json={"model": "smoke", "messages": HELLO, "max_tokens": 5, "temperature": 0})
        done = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                          json={"model": "smoke", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    finally:
        srv.stop()
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop", choice
    assert "<|" in done.json()["choices"][0]["text"]  # a raw completion is not a chat turn: it may show them


def test_serve_settings_are_one_object_checked_before_anything_loads(bundle, monkeypatch):
    from recurchat.cli import build_parser
    from recurchat.errors import UserError
    from recurchat.serve.settings import ServeConfig

    with pytest.raises(UserError, match="batching must be 'static' or 'continuous'"):
        create_app(bundle, batching="dynamic")
    with pytest.raises(UserError, match="max_batch must be >= 1"):
        ServeConfig(max_batch=0).validate()
    app = create_app(bundle, ServeConfig(max_batch=3, queue_size=5), model_name="mine")  # keywords override
    assert app.state.service.config.max_batch == 3 and app.state.service.name == "mine"
    assert app.state.service.scheduler.max_batch == 3
    monkeypatch.setenv("RECURCHAT_API_KEY", "from-env")
    assert create_app(bundle).state.service.config.api_key == "from-env"
    # every `recurchat serve` flag is a ServeConfig field of the same name (the CLI builds it in one line)
    args = build_parser(["serve"]).parse_args(["serve", "--ckpt", "x"])
    flags = set(vars(args)) - {"command", "func", "ckpt", "threads"}  # --threads is set process-wide by the CLI
    assert flags <= {f for f in ServeConfig.__dataclass_fields__}
