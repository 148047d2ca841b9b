"""How errors leave the server: each as OpenAI's body {"error": {"message", "type", "param", "code"}}.

A client mistake (ApiError, UserError) is a 4xx with its message. Anything else is a bug: a 500 whose message points
at the log, where its traceback is written once (the scheduler has already logged an EngineFailure). Routes are
`guarded` so a bug becomes that 500 inside the app: an exception left to Starlette's last-resort handler makes
uvicorn reset the connection before the client reads the reply. Exercised by `pytest tests/serve/test_server.py`.
"""

from __future__ import annotations

import functools
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from recurchat.errors import UserError
from recurchat.serve.api_schema import ApiError, validation_error
from recurchat.serve.scheduler import EngineFailure

log = logging.getLogger("recurchat.server")


def as_api_error(e: BaseException, where: str) -> ApiError:
    """The reply for `e`: itself, a 400 for a UserError, else a 500 (logged here unless already logged)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UserError):
        return ApiError(400, str(e))
    if not isinstance(e, EngineFailure):
        log.error("%s failed", where, exc_info=e)
    return ApiError(500, "internal server error: the server log has the traceback", type="server_error")


def guarded(handler):
    """A route whose exceptions become their OpenAI-style reply inside the app (see the module docstring)."""

    @functools.wraps(handler)
    async def route(request: Request):
        try:
            return await handler(request)
        except (ApiError, RequestValidationError, StarletteHTTPException):
            raise
        except Exception as e:
            raise as_api_error(e, f"{request.method} {request.url.path}") from None
    return route


def add_error_handlers(app: FastAPI) -> None:
    """Errors raised outside a guarded route (body parsing, routing, middleware) get the same replies."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        return validation_error(list(e.errors())).response()

    @app.exception_handler(json.JSONDecodeError)
    async def on_json(request: Request, e: json.JSONDecodeError):
        return ApiError(400, f"malformed JSON body: {e}", code="invalid_json").response()

    @app.exception_handler(UserError)
    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception):
        return as_api_error(e, f"{request.method} {request.url.path}").response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind).response()
