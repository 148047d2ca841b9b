"""The HTTP access guard in front of the API: bearer-key check on everything but the chat page's files and /health,
then a request-body cap (413) enforced while the body is read, not after. ASGI middleware, so a rejected upload never
reaches FastAPI's parsing, and an unauthenticated one is answered at once, its body never read.

Exercised by `pytest tests/serve/test_server.py` (wrong-auth and oversized-body cases).
"""

from __future__ import annotations

import hmac

from recurchat.serve.api_schema import ApiError


def is_public(path: str) -> bool:
    """The chat page (which asks for the key itself) and the health check need no key; the API and its docs do."""
    return path in ("/", "/health") or path.startswith("/web/")


class AccessGuard:
    """ASGI middleware: API-key check (all but PUBLIC paths), then a body-size cap (413) enforced while reading."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and not is_public(scope["path"]):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                return await ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                      code="invalid_api_key")(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_body:
                if more:  # read the rest so the client sees the 413 instead of a reset mid-upload
                    await _drain(receive, 16 * self.max_body)
                return await ApiError(413, f"request body exceeds {self.max_body} bytes",
                                      code="request_too_large")(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects still arrive

        await self.app(scope, replay, send)


async def _drain(receive, limit: int) -> None:
    seen = 0
    while seen <= limit:
        msg = await receive()
        seen += len(msg.get("body", b""))
        if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
            return
