"""The continuous scheduler: requests join the running batch at the next decode step and leave when they finish.

    recurchat serve --ckpt runs/tiny                       # --batching continuous is the default
    recurchat bench serve --ckpt runs/tiny --json b.json   # static vs continuous under the same load

Where the static scheduler (serve/scheduler.py) runs a batch to its end, here the engine thread loops over steps:
admit waiting jobs into free rows, run one step (infer/batcher.py: decode, chunked prefill, sample), post each
token to its job at once. Jobs with different recursion settings share a step (each row runs its own depth plan);
only the KV layout splits them: a pool per (kv strategy, iteration slots), its slots the next power of two of the
deepest plan it serves and at least r_max's, so a deeper pool also takes shallower jobs. A pool is allocated when
first needed, reused while it has work, and dropped when idle. With a KV budget, a pool holds as many rows as the
budget has room for (each row the whole context at the pool's depth); a job that could not fit even one row of
its own is refused at submit with a 400. Exercised by `pytest tests/serve/test_continuous.py`.
"""

from __future__ import annotations

import time

from recurchat.errors import UserError
from recurchat.infer.batcher import ContinuousBatch, Sequence, new_generator
from recurchat.infer.engine import Engine, Event
from recurchat.infer.kv_cache import bytes_per_token
from recurchat.infer.plan import DepthPlan
from recurchat.serve.scheduler import EngineFailure, Job, KVBudgetExceeded, Scheduler, SchedulerClosed, log


def slots_for(depth: int, r_max: int) -> int:
    """A pool's iteration slots for a plan of `depth`: the next power of two, and at least r_max's, so that the
    usual plans (r̄ fixed, exits capped at r_max) all share one pool and so one step."""
    return 1 << max(0, max(depth, r_max) - 1).bit_length()


class ContinuousScheduler(Scheduler):
    def __init__(self, engine: Engine, max_batch: int = 8, queue_size: int = 64, kv_budget_bytes: int = 0,
                 prefill_chunk: int = 256):
        super().__init__(engine, max_batch=max_batch, queue_size=queue_size, batch_window_s=0.0,
                         kv_budget_bytes=kv_budget_bytes)
        self.prefill_chunk = prefill_chunk
        self._pools: dict[tuple[str, int], ContinuousBatch] = {}
        self._jobs: dict[int, Job] = {}  # running jobs by id (the Sequence id)
        self._stats.update(steps=0, pools_live=0, pools_created=0)  # /health: allocated now vs ever

    def _running_jobs(self) -> list[Job]:
        return list(self._jobs.values())

    # -- memory ---------------------------------------------------------------------------------------------------

    def row_bytes(self, kv: str, slots: int) -> int:
        return self.engine.cfg.seq_len * bytes_per_token(self.engine.cfg, kv, slots, self.engine.dtype.torch_dtype)

    def _pool_bytes(self) -> int:
        return sum(p.cache.nbytes() for p in self._pools.values())

    def _check_budget(self, job: Job) -> None:
        if not self.kv_budget_bytes:
            return
        cfg = self.engine.cfg
        need = self.row_bytes(job.recur.kv, slots_for(DepthPlan.of(job.recur, cfg).depth, cfg.r_max))
        if need > self.kv_budget_bytes:
            with self._cond:
                self._stats["too_large"] += 1
            mib = 2**20
            raise KVBudgetExceeded(
                f"a KV-pool row for this request needs {need / mib:.1f} MiB (the context of {self.engine.cfg.seq_len} "
                f"positions, kv {job.recur.kv}, at its recursion depth) but the server's KV budget is "
                f"{self.kv_budget_bytes / mib:.1f} MiB; lower the recursion depth or use kv_strategy 'last'")

    # -- admission (under the lock) -------------------------------------------------------------------------------

    def _pool_for(self, plan: DepthPlan, kv: str) -> ContinuousBatch | None:
        """A pool with a free row that can run `plan`, or a new one if the budget has room; None: wait."""
        fitting = [p for (k, slots), p in self._pools.items() if k == kv and slots >= plan.depth and p.free]
        if fitting:
            return min(fitting, key=lambda p: p.depth)
        slots = slots_for(plan.depth, self.engine.cfg.r_max)
        if (kv, slots) in self._pools:
            return None  # that pool is full: wait for a row
        rows = self.max_batch
        if self.kv_budget_bytes:
            rows = min(rows, (self.kv_budget_bytes - self._pool_bytes()) // self.row_bytes(kv, slots))
        if rows < 1:
            return None
        pool = ContinuousBatch(self.engine.runner, rows, self.engine.cfg.seq_len, kv, slots, self.prefill_chunk)
        self._pools[(kv, slots)] = pool
        self._stats["pools_created"] += 1
        self._stats["pools_live"] = len(self._pools)
        return pool

    def _admit(self) -> list[Job]:
        """Move waiting jobs into pools while rows are free; returns the jobs dropped as cancelled before starting."""
        waiting, dropped = list(self._pending), []
        self._pending.clear()
        for job in waiting:
            if job.cancel_reason is not None:
                dropped.append(job)
                continue
            plan = DepthPlan.of(job.recur, self.engine.cfg)
            pool = self._pool_for(plan, job.recur.kv) if len(self._jobs) < self.max_batch else None
            if pool is None:
                self._pending.append(job)
                continue
            seq = Sequence(job.id, job.prompt, job.sampling, plan, new_generator(job.sampling.seed, self.engine.device),
                           job.recur.warm_start)
            if not pool.fits(seq):  # the server checks prompts first; a direct caller may not have
                job.done = True
                job.post(UserError(f"a prompt of {len(job.prompt)} tokens does not fit the context of "
                                    f"{pool.max_len}"))
                continue
            pool.add(seq)
            self._jobs[job.id] = job
        self._stats["cancelled"] += len(dropped)
        kv = self._pool_bytes()
        self._stats["kv_bytes_running"] = kv
        self._stats["kv_bytes_peak"] = max(self._stats["kv_bytes_peak"], kv)
        return dropped

    # -- the engine thread ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        with self.engine.runner.autocast():  # one region for the thread: weights are cast to bf16 once, not every step
            while True:
                with self._cond:
                    while not self._pending and not self._jobs and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        break
                    dropped = self._admit()
                for job in dropped:
                    job.done = True
                    job.post(Event(0, -1, 0, "cancelled"))
                for key, pool in list(self._pools.items()):
                    if pool.busy:
                        self._step(key, pool)
                with self._cond:
                    for key in [k for k, p in self._pools.items() if not p.busy]:
                        del self._pools[key]  # idle: its memory goes back to the budget
                    self._stats.update(pools_live=len(self._pools), kv_bytes_running=self._pool_bytes())
        self._fail_all(SchedulerClosed("the server is shutting down"))

    def _step(self, key: tuple[str, int], pool: ContinuousBatch) -> None:
        t0 = time.perf_counter()
        gone = lambda seq: self._jobs[seq.id].cancel_reason is not None  # noqa: E731
        try:
            events = pool.cancel_waiting(gone) + pool.step(gone)
        except Exception as e:  # a bug or an input nobody caught: fail this pool's jobs, keep serving the rest
            self._fail_pool(key, pool, e)
            return
        for ev in events:
            self._deliver(ev)
        with self._cond:
            self._stats["steps"] += 1
            self._stats["tokens"] += sum(1 for ev in events if ev.token >= 0)
            self._stats["busy_s"] += time.perf_counter() - t0

    def _deliver(self, ev: Event) -> None:
        job = self._jobs[ev.row]
        if ev.finish_reason is not None:
            job.done = True
            key = {"cancelled": "stopped" if job.cancel_reason == "stop" else "cancelled"}.get(
                ev.finish_reason, "completed")
            with self._cond:
                self._stats[key] += 1
                del self._jobs[job.id]
        job.post(Event(0, ev.token, ev.depth, ev.finish_reason))  # a job is one row: its events say row 0

    def _fail_pool(self, key: tuple[str, int], pool: ContinuousBatch, e: Exception) -> None:
        if not isinstance(e, UserError):
            log.exception("generation failed for a step of %d request(s)", len(pool.sequences))
            cause, e = e, EngineFailure(f"generation failed ({type(e).__name__})")
            e.__cause__ = cause
        with self._cond:
            jobs = [self._jobs.pop(s.id) for s in pool.sequences]
            self._pools.pop(key, None)
            self._stats["failed"] += len(jobs)
        for job in jobs:
            job.done = True
            job.post(e)

    def _fail_all(self, e: Exception) -> None:
        with self._cond:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._pools.clear()
        for job in jobs:
            job.done = True
            job.post(e)

