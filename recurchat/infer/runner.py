"""The model runner: the passes every inference path stands on — a chunk of new tokens at fixed depth (the prefill,
speculative verification), and one decode token per row with per-row depth plans and exits — and the autocast
region they run in. The engine (infer/engine.py: check, stream, generate, score), the step-level batcher
(infer/batcher.py) and loop-count speculation (infer/speculative.py) are built on these, as nano-vllm's engine
stands on its model runner. Exercised by `pytest tests/infer/test_engine.py tests/infer/test_speculative.py`.

- chunk: T new tokens for each of some cache rows at fixed r; every iteration's K/V of those positions is written.
- decode: one token per row; after each iteration the rows' criteria (infer/exit.py via ExitChecks) mark rows done,
  which leave the recurrent computation (the active rows are gathered when the set changes, so a batch whose easy
  tokens stop early does less work) and have their K/V filled forward for deeper readers.
- fixed_step: a decode step whose rows all run one fixed depth is one pass with no exit bookkeeping; `compile=True`
  hands it to torch.compile (`--compile`), so the small ops of a whole step fuse into one graph.
- iterations / extra_heads count recurrent-block applications × rows and coda + head runs beyond one per token.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from recurchat.infer.kv_cache import KVCache
from recurchat.infer.plan import ExitChecks, RowPlans
from recurchat.model.exit_gate import ExitGate
from recurchat.model.hardware import choose_dtype, decode_matmuls, inference_banner
from recurchat.model.recurrent import RecurrentLM

__all__ = ["ActiveRows", "DecodeOut", "Runner"]


@dataclass
class ActiveRows:
    """The rows of one decode step that are still iterating, compacted: `keep(mask)` shrinks all of them together."""

    local: torch.Tensor  # each row's position in this step's batch
    e: torch.Tensor  # prelude output (the adapter's input every iteration)
    s: torch.Tensor  # recurrent state
    cos: torch.Tensor  # rotary angles at each row's position
    sin: torch.Tensor
    rows: torch.Tensor  # KV-cache rows
    pos: torch.Tensor  # positions in the sequence
    view: object  # the cache's view of (rows, pos)
    plans: RowPlans  # each row's criterion, minimum and maximum iterations

    @property
    def size(self) -> int:
        return self.local.numel()

    def keep(self, mask: torch.Tensor, cache: KVCache) -> None:
        self.local, self.e, self.s = self.local[mask], self.e[mask], self.s[mask]
        self.cos, self.sin, self.rows, self.pos = self.cos[mask], self.sin[mask], self.rows[mask], self.pos[mask]
        self.view = cache.rows(self.rows, self.pos)
        self.plans = self.plans.take(mask)


@dataclass
class DecodeOut:
    logits: torch.Tensor  # [n, V] at each row's exit
    state: torch.Tensor  # [n, 1, d] final recurrent state (for warm starts)
    depth: torch.Tensor  # [n] iterations each row ran
    headless: torch.Tensor  # [n] bool: stopped without logits yet (the coda and head run once, after the loop)


def compile_step(step, device: torch.device):
    """torch.compile of a runner's pass (its decode step, its verification chunk), with dynamic shapes (one graph for
    every batch size, chunk and cache length). What a batch-1 step pays around its kernels is kept small four ways:
    - On a CPU the step's wrapper is generated as C++ (inductor's cpp_wrapper) rather than Python: a batch-1 step is
      bound by the per-kernel calls the wrapper makes (504 → 606 tok/s on a compiled cpu-tiny step, Xeon with AMX).
    - Dynamo's guards on the model's modules and parameters (about three in four of a step's ~600 guards, 60 µs of
      a 1.7 ms cpu-tiny step) are dropped (torch.compiler.skip_guard_on_all_nn_modules_unsafe): a runner's model
      keeps its module tree, parameter shapes and dtype for the runner's life (weights may change in place).
    - Dynamo keeps graphs per code object, so the step is compiled from a private copy of its code: without the
      module guards, another runner's graph for a different model could otherwise pass the guards that remain.
    - A matmul of one row (a batch-1 decode step's GEMVs, K and N up to 2048) is decomposed into a multiply and a
      sum that inductor generates itself (its decompose_mm_pass, off by default): aten's mm costs a dispatch per
      call, and copies its input first, since inductor gives a size-1 row a stride of 0 (53 calls a cpu-tiny token;
      b1 722 → 762 tok/s, Xeon AVX512).
    The graph reads each attention layer's fused QKV weight as it stands, so every call first brings them up to date
    (RecurrentLM.refresh_fused_weights). GPUs keep the default wrapper (untested here with cpp_wrapper)."""
    fn, runner = step.__func__, step.__self__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(runner):x}")
    private = types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                                  fn.__closure__), runner)
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if device.type == "cpu":
        options["cpp_wrapper"] = True
        options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
    graph = torch.compile(private, dynamic=True, options=options)

    def run(*args):
        runner.model.refresh_fused_weights()
        return graph(*args)
    return run


class Runner:
    def __init__(self, model: RecurrentLM, dtype: str = "auto", exit_gate: ExitGate | None = None,
                 compile: bool = False, decode_rows: int | None = None):
        """`dtype`: auto | bf16 | fp32, resolved for the model's device by model/hardware.py (bf16 = autocast), which
        for a compiled runner weighs `decode_rows`, the batch it mostly decodes (a small compiled batch decodes in
        fp32 on a CPU). `exit_gate`: the checkpoint's learned gate (checkpoint.load_exit_gate), which the gate:P
        criterion needs.
        `compile`: decode steps whose rows all run one fixed depth go through `torch.compile(fixed_step)`: one graph
        fuses the whole step's small ops (norms, rotary, casts, cache writes), which bound an eager step at small
        batch. Shapes are dynamic, so one graph serves every batch size and cache length; each distinct r, warm start
        or row order compiles once more. Steps with an exit criterion stay eager (their host checks break the graph);
        a noise state init stays eager too (compiled and eager random streams differ)."""
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.exit_gate = exit_gate.to(self.device).eval() if exit_gate is not None else None
        compiled = compile and self.cfg.state_init != "noise"
        eager = decode_matmuls(self.cfg, decode_rows) if decode_rows and not compiled else None
        self.dtype = choose_dtype(dtype, self.device, decode_rows if compiled else None, eager)
        self.iterations = 0  # recurrent-block applications × rows, for compute accounting
        self.extra_heads = 0  # coda + lm_head runs × rows beyond one per token (exit checks that did not exit)
        self.compiled_step = compile_step(self.fixed_step, self.device) if compiled else None
        self.compiled_chunk = compile_step(self.chunk_pass, self.device) if compiled else None

    def autocast(self):
        """The region every pass runs in (bf16 autocast or nothing); hold one region across many steps so its cache
        keeps each weight's bf16 copy instead of casting every weight again at every step."""
        return self.dtype.autocast(self.device)

    def describe(self) -> str:
        """The banner line: device, dtype and why, threads, the measured peak of this model's matmuls."""
        return inference_banner(self.device, self.dtype, self.cfg)

    def chunk(self, cache: KVCache, idx: torch.Tensor, start: int | torch.Tensor, r: int,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [n, T, V], final states or None) at fixed depth r for T new tokens in each of cache `rows`
        (default all): the prefill (start 0, a causal block from position 0) or, with `start` a tensor of one start
        per row, tokens at positions start..start+T−1 that read the cache before them (speculative verification).
        Every iteration's K/V of these positions is written."""
        m = self.model
        n, T = idx.shape
        if not isinstance(start, torch.Tensor) and start:
            start = torch.full((n,), start, dtype=torch.long, device=self.device)
        if isinstance(start, torch.Tensor):
            at = start[:, None] + torch.arange(T, device=self.device)
            if int(at.max()) >= m.cos.size(1):
                raise ValueError(f"positions up to {int(at.max()) + 1} exceed the context length {m.cos.size(1)}")
            cos, sin = m.cos[0, at], m.sin[0, at]  # [n, T, 1, D/2]: positions of their own per row
        else:
            cos, sin = m.rope(start, T)
        view = cache.rows(torch.arange(n, device=self.device) if rows is None else rows, None, start=start, chunk=T)
        if m.recur:
            self.iterations += r * n * (T if isinstance(start, torch.Tensor) else 1)  # a prefill counts once per row
        verify = self.compiled_chunk is not None and isinstance(start, torch.Tensor)
        return (self.compiled_chunk if verify else self.chunk_pass)(cache, idx, view, cos, sin, r)

    def chunk_pass(self, cache: KVCache, idx: torch.Tensor, view, cos: torch.Tensor, sin: torch.Tensor,
                   r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What `chunk` runs once it has the positions: prelude, r iterations, coda, head over the chunk's tokens.
        With `compile=True` a chunk after the start of its rows (speculative verification) runs it compiled; a
        prefill stays eager (one per prompt, and it brings every fused weight up to date)."""
        m = self.model
        x = m.run_prelude(idx, cos, sin, cache.prelude(view))
        state = None
        if m.recur:
            x = state = m.loop(x, m.initial_state(x), cos, sin, r, kv=lambda i: cache.recur(i, view))
        return m.head(m.run_coda(x, cos, sin, cache.coda(view))), state

    def prefill(self, cache: KVCache, idx: torch.Tensor, lens: torch.Tensor, r: int, max_steps: int):
        """Last-position logits and states of each row's prompt (rows padded to the longest), at depth r."""
        logits, state = self.chunk(cache, idx, 0, r)
        rows = torch.arange(idx.size(0), device=self.device)
        if state is not None:
            cache.fill_forward(rows, None, r, max_steps)
        last = lens - 1
        return logits[rows, last], (state[rows, last][:, None] if state is not None else None)

    def decode(self, cache: KVCache, tok: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                warm: torch.Tensor | None, plans: RowPlans, warm_rows: torch.Tensor | None = None):
        """One token for each of `rows`, each row run by its own plan; returns logits [n, V], depths [n], final
        states [n, 1, d]. `warm` [n, 1, d] seeds the rows of `warm_rows` (default: all) instead of init(e)."""
        m = self.model
        view = cache.rows(rows, pos)
        n, fixed = rows.numel(), plans.fixed_depth() if m.recur else 0
        if fixed is not None:  # every row runs the same fixed depth: one pass, no exit bookkeeping
            self.iterations += fixed * n
            step = self.fixed_step if self.compiled_step is None else self.compiled_step
            logits, state = step(cache, tok, view, pos, fixed, warm, warm_rows)
            return logits, torch.full((n,), fixed, dtype=torch.long, device=self.device), state
        cos, sin = self.rotary_at(pos)
        x = m.run_prelude(tok[:, None], cos, sin, cache.prelude(view))
        out = DecodeOut(torch.empty(n, self.cfg.vocab_size, device=self.device), torch.empty_like(x),
                        torch.zeros(n, dtype=torch.long, device=self.device),
                        torch.zeros(n, dtype=torch.bool, device=self.device))
        s0 = self.start_state(x, warm, warm_rows)
        act = ActiveRows(torch.arange(n, device=self.device), x, s0, cos, sin, rows, pos, view, plans)
        checks = ExitChecks(plans, act.s[:, -1], self.exit_gate)

        def after(step: int, s: torch.Tensor):  # the exit checks, and the rows that stopped leave the batch
            act.s = s
            self.iterations += act.size
            if step not in checks.steps:
                return None
            done = self._check_exit(act, cache, checks, out, step)
            if not bool(done.any()):
                return None
            self._retire(act, done, cache, out, step)
            if bool(done.all()):
                return ()
            checks.keep(act.plans.group, ~done)
            act.keep(~done, cache)
            return act.e, act.s, act.cos, act.sin

        m.loop(act.e, act.s, act.cos, act.sin, checks.last_step, kv=lambda i: cache.recur(i, act.view), after=after)
        if bool(out.headless.any()):
            # one coda + head pass for every row that stopped without logits, whatever its depth: on a
            # memory-bound step a pass per exit depth would read the coda's and the head's weights once per depth
            at = out.headless.nonzero().squeeze(1)
            hidden = m.run_coda(out.state[at], cos[at], sin[at], cache.coda(cache.rows(rows[at], pos[at])))
            out.logits[at] = m.head(hidden)[:, -1].float()
        return out.logits, out.depth, out.state

    def start_state(self, x: torch.Tensor, warm: torch.Tensor | None, warm_rows: torch.Tensor | None) -> torch.Tensor:
        """s₀ of a decode step: init(e), or `warm` on the rows of `warm_rows` (default: all)."""
        s0 = self.model.initial_state(x)
        if warm is None:
            return s0
        return warm if warm_rows is None else torch.where(warm_rows[:, None, None], warm.to(s0.dtype), s0)

    def rotary_at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, 1, 1, D/2] at one position per row."""
        return self.model.cos[0, pos].unsqueeze(1), self.model.sin[0, pos].unsqueeze(1)

    def fixed_step(self, cache: KVCache, tok: torch.Tensor, view, pos: torch.Tensor, r: int,
                   warm: torch.Tensor | None, warm_rows: torch.Tensor | None):
        """(logits [n, V] fp32, final states [n, 1, d] or None) of one decode token per row at `pos`, every row at
        depth r (0: a standard model): prelude, r iterations, coda, head — the pass `compile=True` hands to
        torch.compile, rotary look-up included."""
        m = self.model
        cos, sin = self.rotary_at(pos)
        x = m.run_prelude(tok[:, None], cos, sin, cache.prelude(view))
        state = None
        if r:
            # the coda reads the state in the prelude output's dtype, as decode's per-iteration path does (under bf16
            # autocast the loop may end in bf16), so rows decode alike whichever path their step takes
            s = m.loop(x, self.start_state(x, warm, warm_rows), cos, sin, r, kv=lambda i: cache.recur(i, view))
            x = state = s.to(x.dtype)
        # the head reads [n, d], not [n, 1, d]: compiled, a size-1 dimension folded into the rows of a matmul that
        # stays an aten mm (a head wider than decompose_mm_pass takes) gets a stride of 0, and mm copies its input
        return m.head(m.run_coda(x, cos, sin, cache.coda(view))[:, -1]), state  # head: fp32 logits

    def _check_exit(self, act: ActiveRows, cache: KVCache, checks: ExitChecks, out: DecodeOut,
                    step: int) -> torch.Tensor:
        """Rows that stop at `step`: at their maximum, or by their criterion once past their minimum. Rows whose
        criterion ran the head have their logits written to `out` here; the others are marked headless."""
        m, done = self.model, act.plans.max_steps <= step
        with_logits = torch.zeros_like(done)
        for g, crit in checks.due(step):
            rows = slice(None) if checks.single else act.plans.group == g
            if not checks.single and not bool(rows.any()):
                continue
            logits = None
            if crit.needs_logits:
                view = act.view if checks.single else cache.rows(act.rows[rows], act.pos[rows])
                logits = m.head(m.run_coda(act.s[rows], act.cos[rows], act.sin[rows], cache.coda(view)))[:, -1]
            stop = checks.trackers[g].update(step, act.s[rows][:, -1], logits) & (act.plans.min_steps[rows] <= step)
            stop = stop | done[rows]
            done[rows] = stop
            if logits is not None:
                out.logits[act.local[rows][stop]] = logits[stop].float()
                with_logits[rows] = stop
                self.extra_heads += int((~stop).sum())
        out.headless[act.local[done & ~with_logits]] = True
        return done

    def _retire(self, act: ActiveRows, done: torch.Tensor, cache: KVCache, out: DecodeOut, step: int) -> None:
        """Record the rows that stop at `step` and fill their K/V forward for deeper readers."""
        ex = act.local[done]
        out.state[ex] = act.s[done].to(out.state.dtype)
        out.depth[ex] = step
        cache.fill_forward(act.rows[done], act.pos[done], step, int(act.plans.max_steps[done].max()))
