"""The OpenAI-compatible server, live: the official `openai` client and raw httpx against uvicorn on 127.0.0.1 —
happy paths, bad input, concurrency, back-pressure and cancellation (errors, limits and guards:
test_server_guards.py; fixtures: conftest.py).

Run: `pytest tests/serve/test_server.py` (a smoke model is trained once for the module; about a minute on 2 cores).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from server_support import AUTH, HELLO, KEY, SLOW, sse, stats

from recurchat.serve.server import create_app, start_in_thread

# -- happy paths through the official client -------------------------------------------------------------------------


def test_models_health_and_page(client, http, server):
    assert [m.id for m in client.models.list().data] == ["smoke"]
    health = httpx.get(f"{server.url}/health").json()  # no key needed: load balancers probe it
    assert health["status"] == "ok" and health["model"] == "smoke"
    page = http.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and "web/app.js" in page.text
    assert http.get("/web/app.js").status_code == 200 and http.get("/web/style.css").status_code == 200


def test_chat_non_stream_fixed_depth(client):
    r = client.chat.completions.create(model="smoke", messages=HELLO, max_tokens=8, seed=1,
                                       extra_body={"return_depths": True, "recursion": {"num_recur": 3}})
    d = r.to_dict()
    choice = d["choices"][0]
    assert d["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    u = d["usage"]
    assert 1 <= u["completion_tokens"] <= 8 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["mean_depth"] == 3.0 and u["max_depth"] == 3
    assert choice["depths"] == [3] * u["completion_tokens"]


def test_chat_stream_with_exit(client):
    chunks = list(client.chat.completions.create(
        model="recurchat", messages=HELLO, max_tokens=10, stream=True, seed=2,
        extra_body={"return_depths": True, "recursion": {"exit": "argmax:1000", "max_recur": 5},
                    "kv_strategy": "last"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is chunks[-1]
    depths = [d for c in chunks for d in c.to_dict()["choices"][0]["depths"]]
    usage = chunks[-1].to_dict()["usage"]
    assert len(depths) == usage["completion_tokens"] >= 1
    # a 1000-iteration argmax streak never happens: every decoded token runs to max_recur; the first comes from
    # prefill, at r̄ = 2
    assert depths[0] == 2 and all(d == 5 for d in depths[1:]) and usage["max_depth"] == max(depths), depths


def test_fixed_vs_exit_depths(client):
    def usage(recursion: dict) -> dict:
        r = client.completions.create(model="smoke", prompt="The", max_tokens=12, temperature=0,
                                      extra_body={"recursion": recursion})
        return r.to_dict()["usage"]

    assert usage({"num_recur": 1})["mean_depth"] == 1.0
    shallow = usage({"exit": "latent:1e9", "max_recur": 6})  # any change is small enough: exit at the first check
    deep = usage({"exit": "argmax:1000", "max_recur": 6})
    assert shallow["max_depth"] <= 2 < deep["mean_depth"] and deep["max_depth"] == 6


def test_completions_stop_strings_and_stream(client):
    def complete(**kw):
        return client.completions.create(model="smoke", prompt="The", max_tokens=20, temperature=0, **kw)

    full = complete().choices[0].text
    assert full == complete().choices[0].text  # greedy is deterministic
    k = len(full) // 2
    stop = full[k:k + 2]
    cut = complete(stop=[stop, "never-appears"])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(complete(stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_client_errors_map_to_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model="smoke", messages=HELLO, n=2)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -- bad input: always 4xx with an OpenAI error body, and the server keeps serving --------------------------------


def bad_requests() -> list[tuple[str, dict | bytes, dict]]:
    """(path, JSON body or raw bytes, extra headers) — each one a client mistake."""
    chat = {"model": "smoke", "messages": HELLO, "max_tokens": 4}
    comp = {"model": "smoke", "prompt": "The", "max_tokens": 4}
    mutations = {
        "model": [None, 1, "", "gpt-4", ["smoke"], "x" * 300],
        "messages": [None, [], "hi", [{}], [{"role": "user"}], [{"content": "x"}], [{"role": "bot", "content": "x"}],
                     [{"role": "user", "content": 1}], [{"role": "user", "content": None}],
                     [{"role": "assistant", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}],
                     [{"role": "user", "content": "word " * 300}], ["hello"], {"role": "user", "content": "x"}],
        "max_tokens": [0, -1, "5", 1.5, 10**12, True, 65, 2**70],
        "max_completion_tokens": [0, "3", 10**9],
        "temperature": [-0.1, 2.1, "hot", [1], 1e300],
        "top_p": [0, 1.5, -1, "x"],
        "top_k": [-1, "3", 0.5],
        "seed": [-1, 2**64, "s", 1.5],
        "stop": [1, [1], ["a"] * 5, "", [""], {"s": 1}],
        "n": [2, 0, -1, "1", 1.0, 100],
        "stream": ["yes", 1, "true"],
        "recursion": ["deep", 4, [], {"num_recur": 0}, {"num_recur": -1}, {"num_recur": 10**9}, {"num_recur": "4"},
                      {"num_recur": 2.5}, {"exit": "kl"}, {"exit": "bogus:1"}, {"exit": "kl:-1"}, {"exit": "fixed:0"},
                      {"exit": "kl:abc"}, {"exit": ""}, {"exit": 3}, {"num_recur": 2, "exit": "kl:1e-3"},
                      {"max_recur": 0}, {"max_recur": 10**6}, {"unknown": 1}, {"exit": "fixed:1000"},
                      {"min_recur": 50}, {"exit": "argmax:1.5"}, {"warm_start": "yes"}],
        "kv_strategy": ["ring:0", "ring:x", "bogus", "", 5, "full:2", "last:1", "ring:-2"],
        "return_depths": ["yes", 1],
        "stream_options": ["x", {"include_usage": "yes"}],
    }
    out: list[tuple[str, dict | bytes, dict]] = []
    for key, values in mutations.items():
        for v in values:
            out.append(("/v1/chat/completions", {**chat, key: v}, {}))
    for key in ("model", "messages"):
        out.append(("/v1/chat/completions", {k: v for k, v in chat.items() if k != key}, {}))
    for v in [None, 5, [], ["a", "b"], [1.5], [-1], [10**9], [[1, 2]], {"text": "x"}, "x " * 200]:
        out.append(("/v1/completions", {**comp, "prompt": v}, {}))
    out.append(("/v1/completions", {"model": "smoke"}, {}))
    out.append(("/v1/completions", {**comp, "model": "nope"}, {}))
    for raw in [b"", b"{", b"nope", b"[]", b'"str"', b"null", b"1", b"\xff\xfe\x00", b"[" * 100_000,
                b'{"model": "smoke", "messages": [' + b"{" * 50_000, b'{"model": "smoke", "temperature": NaN}',
                b'{"model": "smoke", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
                b'{"model": "smoke"} trailing']:
        out.append(("/v1/chat/completions", raw, {}))
    huge = {**chat, "messages": [{"role": "user", "content": "x" * 1_500_000}]}
    out.append(("/v1/chat/completions", huge, {}))
    for headers in [{"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"bearer {KEY}x"}]:
        out.append(("/v1/chat/completions", chat, headers))
        out.append(("/v1/completions", comp, headers))
    return out


def test_bad_requests_are_4xx_and_server_survives(http):
    cases = bad_requests()
    assert len(cases) >= 100
    statuses = {}
    for path, body, headers in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = http.post(path, content=raw, headers={"Content-Type": "application/json", **headers})
        assert 400 <= r.status_code < 500, (path, raw[:200], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert {400, 401, 404, 413} <= set(statuses), statuses
    for method, path in [("GET", "/v1/nothing"), ("DELETE", "/v1/models"), ("GET", "/v1/chat/completions")]:
        r = http.request(method, path)
        assert r.status_code in (404, 405) and "error" in r.json()
    assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    # greedy, so the same reply every run: a sampled first token can be a special token, which ends a reply empty
    good = http.post("/v1/chat/completions", json={"model": "smoke", "messages": HELLO, "max_tokens": 3,
                                                     "temperature": 0})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
    assert stats(http)["failed"] == 0


# -- concurrency, back-pressure, cancellation ------------------------------------------------------------------------


def test_sixteen_concurrent_streams(http, server):
    before = stats(http)
    results: list[list[str] | BaseException] = [None] * 16  # type: ignore[list-item]

    def worker(i: int) -> None:
        try:
            body = {"model": "smoke", "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 12,
                    "stream": True, "return_depths": True, "seed": i, "temperature": 0.9}
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH,
                              timeout=60) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                results[i] = sse(r.iter_lines())
        except BaseException as e:  # reported below, with the client that failed
            results[i] = e

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    tokens = 0
    for i, payloads in enumerate(results):
        assert isinstance(payloads, list), (i, payloads)
        assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
        chunks = [json.loads(p) for p in payloads[:-1]]
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0] is chunks[-1] and "error" not in chunks[-1]
        tokens += finals[0]["usage"]["completion_tokens"]
        assert sum(len(c["choices"][0]["depths"]) for c in chunks) == finals[0]["usage"]["completion_tokens"]
    after = stats(http)
    assert after["completed"] - before["completed"] == 16
    assert after["batches"] - before["batches"] < 16  # requests shared engine batches
    print(f"\n16 concurrent streams: {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.0f} tok/s, "
          f"{after['batches'] - before['batches']} batches")


def test_queue_full_gives_429(bundle):
    srv = start_in_thread(create_app(bundle, max_batch=1, queue_size=1))
    try:
        codes: list[int] = []
        bodies: list[dict] = []

        def fire() -> None:
            body = {"model": "smoke", "prompt": "The", "max_tokens": 40, "recursion": {"num_recur": 8}}
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            codes.append(r.status_code)
            bodies.append(r.json())

        threads = [threading.Thread(target=fire) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(set(codes)) == [200, 429] and codes.count(200) >= 1, codes
        rejected = [b["error"] for b in bodies if "error" in b]
        assert rejected and all(e["type"] == "rate_limit_error" and e["code"] == "queue_full" for e in rejected)
        health = httpx.get(f"{srv.url}/health").json()["scheduler"]
        assert health["rejected"] == codes.count(429) and health["completed"] == codes.count(200)
    finally:
        srv.stop()


def test_disconnect_cancels_generation(http, server):
    before = stats(http)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**SLOW, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leaving the block after the first chunk closes the connection mid-stream
    deadline = time.monotonic() + 20
    while ((now := stats(http))["cancelled"] == before["cancelled"] or now["running"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1, now
    assert now["completed"] == before["completed"] and now["running"] == 0


def test_disconnect_cancels_non_streaming_request(http, server):
    before = stats(http)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up before the reply is ready
        httpx.post(f"{server.url}/v1/completions", json=SLOW, headers=AUTH, timeout=httpx.Timeout(5, read=0.2))
    deadline = time.monotonic() + 20
    while ((now := stats(http))["cancelled"] == before["cancelled"] or now["running"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1 and now["completed"] == before["completed"], now
