"""Request bodies of the OpenAI-compatible API (pydantic, strict) and the OpenAI-style error they map to.

Exercised by `pytest tests/serve/test_server.py` (the 100+ bad-request test goes through these models).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import pydantic
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

# -- errors ---------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error with OpenAI's body; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    async def __call__(self, scope, receive, send) -> None:  # also a tiny ASGI app, for middleware to answer with
        await self.response()(scope, receive, send)


def _is_union_tag(part: object) -> bool:
    # pydantic names union members in error locations ("prompt.list[int].0"); clients know only field names
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool"))


def _param(loc: tuple | list) -> str | None:
    return ".".join(str(p) for p in loc if p != "body" and not _is_union_tag(p)) or None


def validation_error(errors: list[dict]) -> ApiError:
    e = errors[0]
    if e.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}",
                        code="invalid_json")
    loc = tuple(p for p in e.get("loc", ()) if p != "body")
    tag = next((i for i, p in enumerate(loc) if _is_union_tag(p)), None)
    if tag is None:
        group = [e]
    else:  # a value that fits no member of a union fails once per member: say every way it could be right
        group = [x for x in errors if tuple(p for p in x.get("loc", ()) if p != "body")[:tag] == loc[:tag]]
    where = _param(loc if tag is None else loc[:tag])
    msgs = dict.fromkeys(f"{_param(x.get('loc', ())) or 'body'}: {x.get('msg')}" for x in group)
    return ApiError(400, "; or ".join(msgs), param=where, code="invalid_value" if where else "invalid_request")


# -- request bodies -------------------------------------------------------------------------------------------------

# strict: "0.5" is not a temperature and true is not an n; unknown OpenAI fields (user, logprobs…) are ignored.
STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
StopString = Annotated[str, Field(min_length=1, max_length=256)]


class Recursion(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)  # our own field: typos are loud

    num_recur: int | None = Field(None, ge=1)
    exit: str | None = Field(None, min_length=1, max_length=64)
    max_recur: int | None = Field(None, ge=1)
    min_recur: int | None = Field(None, ge=1)
    warm_start: bool = False


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class Common(BaseModel):
    model_config = STRICT
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    recursion: Recursion | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens through end-of-text tokens (benchmarks, tests)
    kv_strategy: str | None = Field(None, min_length=1, max_length=32)
    return_depths: bool | None = False


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1, max_length=1024)


class CompletionRequest(Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]


async def parse_body(request: Request, cls: type[BaseModel]) -> Any:
    """An application/json body (415 otherwise: a cross-site form or text/plain POST never starts a generation),
    then strict pydantic validation."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, not {content_type or 'missing'}",
                       code="unsupported_media_type")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
