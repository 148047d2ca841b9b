"""One worker thread owns the Engine; HTTP handlers submit jobs and read their tokens from asyncio queues.

    pytest tests/serve/test_server.py      (the server drives this; `recurchat serve --ckpt DIR` in production)

- torch modules and the engine's KV cache are not safe to drive from several threads at once, so exactly one
  thread calls `Engine.stream`; the event loop never blocks on the model.
- Waiting jobs sit in a bounded list (full → `QueueFull`, which the server turns into HTTP 429). The worker takes
  the oldest job plus every waiting job with the same batch key (recursion params + KV strategy: one
  `Engine.stream` call runs one depth plan and one cache layout), up to `max_batch` rows, each row keeping its
  own SamplingParams.
- A KV budget (`kv_budget_bytes`, 0 = none) bounds the one cache a batch allocates: a job joins a batch only while
  the batch's cache (rows × farthest reach × bytes per token, `Engine.cache_bytes`) stays within it, so concurrent
  requests never allocate past it; a job that could not fit even alone is refused at submit (`KVBudgetExceeded`,
  a UserError the server answers with 400 saying why) instead of waiting forever.
- Events go back to the job's asyncio queue through `loop.call_soon_threadsafe` (asyncio queues are not
  thread-safe). A job marked cancelled (client gone, or a stop string matched) makes the engine's
  `cancelled(row)` true at the next step, so its row leaves the batch and its compute stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from recurchat.errors import UserError
from recurchat.infer.engine import Engine, Event, RecurParams
from recurchat.infer.sampling import SamplingParams

log = logging.getLogger("recurchat.server")


class QueueFull(Exception):
    """Too many jobs are already waiting for the engine."""


class KVBudgetExceeded(UserError):
    """This request's KV cache alone is larger than the scheduler's budget: it could never run."""


class EngineFailure(RuntimeError):
    """What a job gets when the engine raised something other than a UserError; the scheduler has already logged
    the original (its `__cause__`) with its traceback, once for the whole batch."""


class SchedulerClosed(Exception):
    """The scheduler was shut down before this job could finish."""


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One request's generation: its prompt and parameters in, an asyncio queue of Events (or an error) out."""

    prompt: list[int]
    sampling: SamplingParams
    recur: RecurParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    cancel_reason: str | None = None  # set from the event loop, read by the worker: a plain attribute is enough
    done: bool = False

    @property
    def reach(self) -> int:
        """Positions this job can fill: its prompt and max_tokens."""
        return len(self.prompt) + self.sampling.max_tokens

    @property
    def key(self) -> tuple:
        return dataclasses.astuple(self.recur)

    def cancel(self, reason: str) -> None:
        """Ask the worker to drop this job (first reason wins); a finished job ignores it."""
        if not self.done and self.cancel_reason is None:
            self.cancel_reason = reason

    def post(self, item: Event | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody is listening
            pass


class Scheduler:
    """Bounded queue + one engine thread that batches compatible jobs; `stats()` backs GET /health."""

    def __init__(self, engine: Engine, max_batch: int = 8, queue_size: int = 64, batch_window_s: float = 0.005,
                 kv_budget_bytes: int = 0):
        if max_batch < 1 or queue_size < 1 or kv_budget_bytes < 0:
            raise ValueError("max_batch and queue_size must be >= 1, kv_budget_bytes >= 0")
        self.engine, self.kv_budget_bytes = engine, kv_budget_bytes
        self.max_batch, self.queue_size, self.batch_window_s = max_batch, queue_size, batch_window_s
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        self._stats = dict(submitted=0, rejected=0, completed=0, cancelled=0, stopped=0, failed=0, batches=0,
                           tokens=0, busy_s=0.0, too_large=0, kv_bytes_running=0, kv_bytes_peak=0)

    # -- event-loop side ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="recurchat-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], sampling: SamplingParams, recur: RecurParams) -> Job:
        """Queue a job; call from the event loop (its queue belongs to that loop). Raises QueueFull."""
        job = Job(prompt, sampling, recur, asyncio.get_running_loop())
        self._check_budget(job)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                self._stats["rejected"] += 1
                raise QueueFull(f"{len(self._pending)} requests are already waiting (queue size {self.queue_size})")
            self._pending.append(job)
            self._stats["submitted"] += 1
            self._cond.notify()
        return job

    def _check_budget(self, job: Job) -> None:
        if not self.kv_budget_bytes:
            return
        need = self.engine.cache_bytes([job.reach], job.recur)
        if need > self.kv_budget_bytes:
            with self._cond:
                self._stats["too_large"] += 1  # "rejected" counts queue-full refusals (429) only
            mib = 2**20
            raise KVBudgetExceeded(
                f"this request's KV cache needs {need / mib:.1f} MiB ({job.reach} positions: prompt + max_tokens, "
                f"kv {job.recur.kv}) but the server's KV budget is {self.kv_budget_bytes / mib:.1f} MiB; lower "
                "max_tokens or the recursion depth, or use kv_strategy 'last'")

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if len(batch) >= self.max_batch or job.key != batch[0].key:
            return False
        return not self.kv_budget_bytes or self.engine.cache_bytes(
            [j.reach for j in batch] + [job.reach], job.recur) <= self.kv_budget_bytes

    def _running_jobs(self) -> list[Job]:
        """The jobs generating now (call under the lock)."""
        return self._running

    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats, queued=len(self._pending), running=len(self._running_jobs()),
                        max_batch=self.max_batch, queue_size=self.queue_size, kv_budget_bytes=self.kv_budget_bytes)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, cut the running batch short, fail the waiting jobs, join the worker."""
        with self._cond:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
            for job in self._running_jobs():
                job.cancel("shutdown")
            self._cond.notify_all()
        for job in waiting:
            job.post(SchedulerClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- worker side ----------------------------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
        if self.batch_window_s > 0:  # requests fired together arrive a few ms apart: let them share a batch
            time.sleep(self.batch_window_s)
        with self._cond:
            if self._closed or not self._pending:  # close() emptied the queue while we waited
                return None if self._closed else []
            first = self._pending.popleft()
            batch, rest = [first], deque()
            while self._pending:
                job = self._pending.popleft()
                (batch if self._fits(batch, job) else rest).append(job)
            self._pending = rest
            live = [j for j in batch if j.cancel_reason is None]
            self._stats["cancelled"] += len(batch) - len(live)  # gone before they started: never cost a step
            self._running = live
            kv = self.engine.cache_bytes([j.reach for j in live], live[0].recur) if live else 0
            self._stats["kv_bytes_running"] = kv
            self._stats["kv_bytes_peak"] = max(self._stats["kv_bytes_peak"], kv)
        for job in batch:
            if job.cancel_reason is not None and job not in live:
                job.done = True
                job.post(Event(0, -1, 0, "cancelled"))  # whoever still awaits the job learns it is over
        return live

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        open_rows = set(range(len(batch)))
        tokens = 0
        try:
            stream = self.engine.stream([j.prompt for j in batch], [j.sampling for j in batch], batch[0].recur,
                                        cancelled=lambda row: batch[row].cancel_reason is not None)
            for events in stream:
                for ev in events:
                    job = batch[ev.row]
                    tokens += 1
                    if ev.finish_reason is not None:
                        open_rows.discard(ev.row)
                        job.done = True
                        key = {"cancelled": "stopped" if job.cancel_reason == "stop" else "cancelled"}.get(
                            ev.finish_reason, "completed")
                        with self._cond:
                            self._stats[key] += 1
                    job.post(ev)
        except Exception as e:  # a bug or a bad input the server did not catch: fail these jobs, keep serving
            if not isinstance(e, UserError):
                log.exception("generation failed for a batch of %d request(s)", len(batch))
                cause, e = e, EngineFailure(f"generation failed ({type(e).__name__})")
                e.__cause__ = cause
            for row in open_rows:
                batch[row].done = True
                batch[row].post(e)
            with self._cond:
                self._stats["failed"] += len(open_rows)
        finally:
            with self._cond:
                self._running = []
                self._stats["kv_bytes_running"] = 0
                self._stats["batches"] += 1
                self._stats["tokens"] += tokens
                self._stats["busy_s"] += time.perf_counter() - t0
