"""What the live-server tests share: the API key, request bodies, and readers of /health and SSE streams.

Used by `pytest tests/serve/test_server.py tests/serve/test_server_guards.py` (fixtures: tests/serve/conftest.py).
"""

from __future__ import annotations

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello there"}]
# A reply whose first token comes from a cheap prefill (r̄ = 2) and every later one runs SLOW_R iterations (an
# argmax streak of 1000 never happens): a client that hangs up after the first chunk leaves ~59 deep tokens undone,
# so the test holds whether the machine is idle or crawling.
SLOW_R = 64
SLOW = {"model": "smoke", "prompt": "The", "max_tokens": 60, "kv_strategy": "last", "ignore_eos": True,
        "recursion": {"exit": "argmax:1000", "max_recur": SLOW_R}}


def post_once(ckpt, body: dict, path: str = "/v1/completions"):
    """Start a server for checkpoint `ckpt`, POST `body` once, stop it; the response."""
    import httpx

    from recurchat.serve.server import create_app, start_in_thread

    srv = start_in_thread(create_app(str(ckpt)))
    try:
        return httpx.post(f"{srv.url}{path}", json=body, timeout=60)
    finally:
        srv.stop()


def stats(http) -> dict:
    return http.get("/health").json()["scheduler"]


def sse(lines) -> list[str]:
    """The data payloads of an SSE stream, checking the wire format (data: lines separated by blank lines)."""
    payloads = []
    for line in lines:
        if line:
            assert line.startswith("data: "), line
            payloads.append(line[len("data: "):])
    return payloads
