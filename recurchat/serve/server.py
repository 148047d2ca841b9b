"""OpenAI-compatible HTTP API for a recursive checkpoint, plus the static chat page under serve/web/.

    recurchat serve --ckpt runs/tiny-sft [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    pytest tests/serve/test_server.py tests/serve/test_web.py

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON or SSE with `"stream": true`), GET /v1/models,
GET /health (scheduler counters), GET / (the chat page). Beyond OpenAI's fields a request may carry
`recursion` ({"num_recur": 4} or {"exit": "kl:1e-3", "max_recur": 16}), `kv_strategy` ("full" | "last" | "ring:K"),
`top_k` and `return_depths`; `usage` always adds `mean_depth` and `max_depth`.

Every client mistake is a 4xx with OpenAI's error body {"error": {"message", "type", "param", "code"}}; only a bug
is a 500. Generation runs on the scheduler's single engine thread (serve/scheduler.py); request bodies and errors
are in serve/api_schema.py, how errors leave in serve/http_errors.py, detokenizing with stop strings in
serve/detokenize.py, auth and body limits in serve/access.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from recurchat.checkpoint import AUTO_EXIT, Checkpoint, calibrated_exit
from recurchat.data.chat import render_prompt
from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurError, RecurParams
from recurchat.infer.sampling import SamplingParams
from recurchat.model.recurrent import RecurrentLM
from recurchat.serve.access import AccessGuard
from recurchat.serve.api_schema import (
    ApiError,
    ChatRequest,
    Common,
    CompletionRequest,
    Recursion,
    parse_body,
)
from recurchat.serve.continuous import ContinuousScheduler
from recurchat.serve.detokenize import TextStream, text_pieces
from recurchat.serve.http_errors import add_error_handlers, as_api_error, guarded
from recurchat.serve.scheduler import Job, KVBudgetExceeded, QueueFull, Scheduler, SchedulerClosed
from recurchat.serve.settings import ServeConfig

WEB_DIR = Path(__file__).parent / "web"
ALIAS = "recurchat"  # accepted as a model id whatever the checkpoint directory is called

# -- the service ------------------------------------------------------------------------------------------------------


class Service:
    """Everything a request needs: tokenizer, limits, scheduler; turns request bodies into engine jobs."""

    def __init__(self, ckpt: Checkpoint, model: RecurrentLM, config: ServeConfig):
        self.tok = ckpt.tokenizer
        self.cfg = model.cfg
        self.config = config  # checked by create_app, which builds it
        self.name = config.model_name or _bundle_name(Path(ckpt.path))
        self.ctx = self.cfg.seq_len
        self.recur_limit = config.max_recur_limit or 4 * self.cfg.r_max  # deeper plans grow the KV cache unbounded
        self.auto_exit = calibrated_exit(ckpt.path)  # what "exit": "auto" means (recurchat calibrate)
        self.engine = Engine.for_checkpoint(ckpt, model, config.dtype, config.compile,
                                            decode_rows=config.max_batch)
        limits = {"max_batch": config.max_batch, "queue_size": config.queue_size,
                  "kv_budget_bytes": config.kv_budget_bytes}
        if config.batching == "continuous":
            self.scheduler: Scheduler = ContinuousScheduler(self.engine, prefill_chunk=config.prefill_chunk, **limits)
        else:
            self.scheduler = Scheduler(self.engine, **limits)
        self.created = int(time.time())
        self.chat_stops = self.tok.special_ids()  # a reply never shows <|user_start|> & co: it ends there

    def model_card(self) -> dict:
        c = self.cfg
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "recurchat",
                "context_length": self.ctx,
                "recursion": {"recursive": c.recursive, "mean_recur": c.mean_recur, "r_max": c.r_max,
                              "max_recur_limit": self.recur_limit}}

    def check_model(self, name: str) -> None:
        if name not in (self.name, ALIAS):
            raise ApiError(404, f"the model {name!r} does not exist (this server serves {self.name!r})",
                           param="model", code="model_not_found")

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            return render_prompt(self.tok, messages)
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and isinstance(p[0], int):
            if not all(0 <= t < self.cfg.vocab_size for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {self.cfg.vocab_size})", param="prompt")
            return list(p)
        return [self.tok.bos_id] + self.tok.encode(p if isinstance(p, str) else p[0])

    def params(self, body: Common, prompt: list[int], stop_ids: tuple[int, ...]) -> tuple[SamplingParams, RecurParams]:
        if body.n not in (None, 1):
            raise ApiError(400, f"n={body.n} is not supported: only n=1", param="n")
        if len(prompt) >= self.ctx:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {self.ctx} tokens",
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if max_tokens is not None and max_tokens > self.ctx:
            raise ApiError(400, f"{param}={max_tokens} exceeds the context length {self.ctx}", param=param)
        sampling = SamplingParams(max_tokens=max_tokens or self.ctx - len(prompt),
                                  temperature=1.0 if body.temperature is None else body.temperature,
                                  top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
                                  seed=body.seed, stop_ids=() if body.ignore_eos else stop_ids)
        return sampling, self.recur_params(body.recursion or Recursion(), body.kv_strategy or "full")

    def recur_params(self, r: Recursion, kv: str) -> RecurParams:
        exit_spec = r.exit
        if exit_spec == AUTO_EXIT:
            if self.auto_exit is None:
                raise ApiError(400, "recursion.exit: 'auto' needs a calibrated exit and this model has none (run "
                               "recurchat calibrate on its checkpoint)", param="recursion.exit")
            exit_spec = self.auto_exit
        recur = RecurParams(num_recur=r.num_recur, exit=exit_spec, min_recur=r.min_recur or 1, max_recur=r.max_recur,
                            warm_start=r.warm_start, kv=kv)
        try:
            return self.engine.check_recur(recur, self.recur_limit)
        except RecurError as e:
            param = "kv_strategy" if e.param == "kv" else f"recursion.{e.param}"
            raise ApiError(400, f"{param}: {e}", param=param) from None

    def submit(self, prompt: list[int], sampling: SamplingParams, recur: RecurParams) -> Job:
        try:
            return self.scheduler.submit(prompt, sampling, recur)
        except KVBudgetExceeded as e:
            raise ApiError(400, str(e), param="max_tokens", code="kv_budget_exceeded") from None
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None


# -- responses --------------------------------------------------------------------------------------------------------


class JobStream(StreamingResponse):
    """SSE response that cancels its job however it ends (finished, client gone, task cancelled)."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel("disconnect")  # a no-op when the job already finished


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def _watch_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel("disconnect")


async def generate(service: Service, request: Request, body: Common, prompt: list[int], stop_ids: tuple[int, ...],
                   chat: bool) -> JSONResponse | StreamingResponse:
    """Queue the job, then either stream SSE chunks or wait for the whole reply; `chat` picks the wire shapes."""
    sampling, recur = service.params(body, prompt, stop_ids)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    ts = TextStream(service.tok.decode, stops)
    job = service.submit(prompt, sampling, recur)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": service.name}

    def choice(text: str | None, depths: list[int], finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if body.return_depths:
            c["depths"] = depths
        return c

    if body.stream:
        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield _sse({**head, "choices": [choice("", [], None, first=True)]})
                async for text, depths, finish in text_pieces(job, ts):
                    if text or depths:  # a token cut away by a stop string still reports its depth
                        yield _sse({**head, "choices": [choice(text, depths, None)]})
                    if finish:
                        yield _sse({**head, "choices": [choice(None, [], finish)], "usage": ts.usage(len(prompt))})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": ts.usage(len(prompt))})
            except Exception as e:  # the headers are sent: report in-band, as OpenAI does
                yield _sse(as_api_error(e, f"streaming {rid}").body())
            yield _sse("[DONE]")
        return JobStream(events(), job)

    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        text, finish = "", "length"
        async for t, _, f in text_pieces(job, ts):
            text, finish = text + t, f or finish
    except SchedulerClosed as e:
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
    finally:
        watcher.cancel()
        job.cancel("disconnect")
    c = choice(text, ts.depths, finish)
    if chat:
        c.pop("delta")
        c = {"index": 0, "message": {"role": "assistant", "content": text}, **c}
    return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": [c],
                         "usage": ts.usage(len(prompt))})


# -- the app ----------------------------------------------------------------------------------------------------------


def _bundle_name(path: Path) -> str:
    path = path.resolve()
    if path.name.startswith("step-"):
        path = path.parent
    return path.parent.name if path.name == "checkpoint" else path.name


def api_routes(service: Service) -> APIRouter:
    """The OpenAI-compatible endpoints, /health and the web page, all served by `service`."""
    routes = APIRouter()

    @routes.post("/v1/chat/completions")
    @guarded
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatRequest)
        service.check_model(body.model)
        prompt = await asyncio.to_thread(service.chat_prompt, body)  # tokenizing a long chat blocks: not on the loop
        return await generate(service, request, body, prompt, service.chat_stops, chat=True)

    @routes.post("/v1/completions")
    @guarded
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        service.check_model(body.model)
        prompt = await asyncio.to_thread(service.completion_prompt, body)
        return await generate(service, request, body, prompt, (service.tok.bos_id,), chat=False)

    @routes.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @routes.get("/v1/models/{name}")
    async def model(name: str):
        service.check_model(name)
        return service.model_card()

    @routes.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, "scheduler": service.scheduler.stats()}

    @routes.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html")

    return routes


def create_app(ckpt_path_or_model_bundle: str | Path | tuple, config: ServeConfig | None = None,
               **settings) -> FastAPI:
    """The app for a checkpoint directory, or for a `(ckpt, model)` pair from `recurchat.checkpoint.load_model`,
    served by `config` (default ServeConfig()) with any of its fields overridden by `settings`."""
    from recurchat.checkpoint import load_model

    config = dataclasses.replace(config or ServeConfig(), **settings).with_key_from_env().validate()
    if isinstance(ckpt_path_or_model_bundle, tuple):
        ckpt, model = ckpt_path_or_model_bundle
    else:
        ckpt, model = load_model(str(ckpt_path_or_model_bundle), config.device)
    service = Service(ckpt, model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        yield
        service.scheduler.close()

    app = FastAPI(title="recurchat", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    add_error_handlers(app)
    app.include_router(api_routes(service))
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    # as middleware (not a wrapper) so the result is still a FastAPI app whose .state embedders can reach
    app.add_middleware(AccessGuard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app


# -- running it -------------------------------------------------------------------------------------------------------


@dataclass
class ServerThread:
    """A uvicorn server on a background thread (tests, notebooks); `stop()` shuts it down."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> ServerThread:
    """Serve `app` on a background thread; port 0 picks a free port (read it from `.port`)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="recurchat-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return ServerThread(server, thread, host, bound)


def serve_main(ckpt: str, config: ServeConfig) -> None:
    """`recurchat serve`: load the checkpoint, serve the API and the chat page until Ctrl-C."""
    app = create_app(ckpt, config)
    name = app.state.service.name
    print(app.state.service.engine.describe(), flush=True)
    print(f"serving {name!r} on http://{config.host}:{config.port}  (chat page at /, API at /v1, health at /health)",
          flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
