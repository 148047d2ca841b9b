"""Batched generation for recursive models: prefill, KV-cached decode, per-row early exit that saves compute.

    recurchat chat --ckpt runs/tiny --exit kl:1e-3 -p "In the beginning"

- Prefill runs each prompt's tokens in one pass (prompts of different lengths are right-padded: causal attention
  never lets a real token see the padding, and decode overwrites it) at a fixed depth; exits are not taken there.
- Decode: one token per unfinished row, each at its own position (its own rotary angle and attention mask).
- Per-row exit: after each iteration the criterion (infer/exit.py) marks rows done; those rows leave the
  recurrent computation — the active rows are gathered once when the set changes, the block runs on them alone, and
  results are scattered back — so a batch in which easy tokens stop early does less work, not just masks it.
  A row that stopped at iteration j has its K/V filled forward so deeper iterations of later tokens read it.
- Warm start (option): the previous token's final recurrent state seeds the next token instead of init(e).
- Per-row plans: each row of a decode step has its own criterion, minimum and maximum (infer/plan.py), so rows of
  different fixed depths and exit criteria share one step.
- `stream()` yields the tokens of each step as they are decided, running the prompts as one continuous batch
  (infer/batcher.py, which the server's continuous scheduler drives too); `generate()` collects them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from recurchat.checkpoint import Checkpoint, load_exit_gate
from recurchat.errors import UserError
from recurchat.infer.batcher import ContinuousBatch, Event, Generation, Sequence, new_generator
from recurchat.infer.kv_cache import KVCache, bytes_per_token
from recurchat.infer.plan import DepthPlan, ExitChecks, RecurError, RecurParams, RowPlans
from recurchat.infer.sampling import SamplingParams
from recurchat.model.exit_gate import ExitGate
from recurchat.model.hardware import choose_dtype, inference_banner
from recurchat.model.recurrent import RecurrentLM

__all__ = ["Engine", "Event", "Generation", "RecurError", "RecurParams"]  # what callers import from here


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


class Engine:
    def __init__(self, model: RecurrentLM, dtype: str = "auto", exit_gate: ExitGate | None = None):
        """`dtype`: auto | bf16 | fp32, resolved for the model's device by model/hardware.py (bf16 = autocast).
        `exit_gate`: the checkpoint's learned gate (checkpoint.load_exit_gate), which the gate:P criterion needs."""
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.exit_gate = exit_gate.to(self.device).eval() if exit_gate is not None else None
        self.dtype = choose_dtype(dtype, self.device)
        self.iterations = 0  # recurrent-block applications × rows, for compute accounting
        self.extra_heads = 0  # coda + lm_head runs × rows beyond one per token (exit checks that did not exit)

    @classmethod
    def for_checkpoint(cls, ckpt: Checkpoint, model: RecurrentLM, dtype: str = "auto") -> "Engine":
        """The engine for a loaded checkpoint (checkpoint.load_model), with the exit gate trained for it, if any."""
        return cls(model, dtype=dtype, exit_gate=load_exit_gate(ckpt.path))

    def _autocast(self):
        return self.dtype.autocast(self.device)

    def describe(self) -> str:
        """The banner line: device, dtype and why, threads, the measured peak of this model's matmuls."""
        return inference_banner(self.device, self.dtype, self.cfg)

    # -- the two passes -------------------------------------------------------------------------------------------

    def _chunk(self, cache: KVCache, idx: torch.Tensor, start: int | torch.Tensor, r: int,
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
        x = m.run_prelude(idx, cos, sin, cache.prelude(view))
        state = None
        if m.recur:
            e, s = x, m.initial_state(x)
            for i in range(r):
                s = m.iterate(e, s, cos, sin, cache.recur(i, view))
            self.iterations += r * n * (T if isinstance(start, torch.Tensor) else 1)  # a prefill counts once per row
            x = state = s
        return m.head(m.run_coda(x, cos, sin, cache.coda(view))), state

    def _prefill(self, cache: KVCache, idx: torch.Tensor, lens: torch.Tensor, r: int, max_steps: int):
        """Last-position logits and states of each row's prompt (rows padded to the longest), at depth r."""
        logits, state = self._chunk(cache, idx, 0, r)
        rows = torch.arange(idx.size(0), device=self.device)
        if state is not None:
            cache.fill_forward(rows, None, r, max_steps)
        last = lens - 1
        return logits[rows, last], (state[rows, last][:, None] if state is not None else None)

    def _decode(self, cache: KVCache, tok: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                warm: torch.Tensor | None, plans: RowPlans, warm_rows: torch.Tensor | None = None):
        """One token for each of `rows`, each row run by its own plan; returns logits [n, V], depths [n], final
        states [n, 1, d]. `warm` [n, 1, d] seeds the rows of `warm_rows` (default: all) instead of init(e)."""
        m = self.model
        cos, sin = m.cos[0, pos].unsqueeze(1), m.sin[0, pos].unsqueeze(1)  # [n, 1, 1, D/2]: a position per row
        view = cache.rows(rows, pos)
        x = m.run_prelude(tok[:, None], cos, sin, cache.prelude(view))
        n = rows.numel()
        if not m.recur:
            logits = m.head(m.run_coda(x, cos, sin, cache.coda(view)))[:, -1]
            return logits, torch.zeros(n, dtype=torch.long, device=self.device), None
        out = DecodeOut(torch.empty(n, self.cfg.vocab_size, device=self.device), torch.empty_like(x),
                        torch.zeros(n, dtype=torch.long, device=self.device),
                        torch.zeros(n, dtype=torch.bool, device=self.device))
        s0 = m.initial_state(x)
        if warm is not None:
            s0 = warm if warm_rows is None else torch.where(warm_rows[:, None, None], warm.to(s0.dtype), s0)
        act = ActiveRows(torch.arange(n, device=self.device), x, s0, cos, sin, rows, pos, view, plans)
        checks = ExitChecks(plans, act.s[:, -1], self.exit_gate)
        for i in range(checks.last_step):
            step = i + 1
            act.s = m.iterate(act.e, act.s, act.cos, act.sin, cache.recur(i, act.view))
            self.iterations += act.size
            if step not in checks.steps:
                continue
            done = self._check_exit(act, cache, checks, out, step)
            if not bool(done.any()):
                continue
            self._retire(act, done, cache, out, step)
            if bool(done.all()):
                break
            checks.keep(act.plans.group, ~done)
            act.keep(~done, cache)
        if bool(out.headless.any()):
            # one coda + head pass for every row that stopped without logits, whatever its depth: on a
            # memory-bound step a pass per exit depth would read the coda's and the head's weights once per depth
            at = out.headless.nonzero().squeeze(1)
            hidden = m.run_coda(out.state[at], cos[at], sin[at], cache.coda(cache.rows(rows[at], pos[at])))
            out.logits[at] = m.head(hidden)[:, -1].float()
        return out.logits, out.depth, out.state

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

    # -- public API ---------------------------------------------------------------------------------------------

    def cache_positions(self, reach: list[int]) -> int:
        """Positions the KV cache of a batch holds: the farthest any row can reach (prompt + max_tokens; its last
        token is sampled, never decoded), capped at the context."""
        return min(self.cfg.seq_len, max(reach))

    def cache_bytes(self, reach: list[int], recur: RecurParams) -> int:
        """Bytes of the KV cache `stream` allocates for rows that reach `reach` positions under `recur` (one
        cache per batch: rows × the farthest reach × the bytes of one token at the plan's deepest iteration)."""
        per_token = bytes_per_token(self.cfg, recur.kv, DepthPlan.of(recur, self.cfg).depth, self.dtype.torch_dtype)
        return len(reach) * self.cache_positions(reach) * per_token

    def check(self, prompts: list[list[int]], recur: RecurParams) -> None:
        """Raise UserError for prompts or recursion settings this engine cannot run, before any compute."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        too_long = [len(p) for p in prompts if len(p) >= self.cfg.seq_len]
        if too_long:
            raise UserError(f"prompt of {too_long[0]} tokens does not fit the context of {self.cfg.seq_len}")
        self.check_recur(recur)

    def check_recur(self, recur: RecurParams, limit: int | None = None) -> RecurParams:
        """RecurParams.validate, plus what this engine has: gate:P needs a learned exit gate."""
        recur.validate(self.cfg, limit)
        if recur.exit and recur.exit.startswith("gate:") and self.exit_gate is None:
            raise RecurError(f"exit {recur.exit!r} needs this checkpoint's exit gate; run recurchat exit-train "
                             "first", "exit")
        return recur

    @torch.no_grad()
    def stream(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None,
               recur: RecurParams | None = None,
               cancelled: Callable[[int], bool] | None = None) -> Iterator[list[Event]]:
        """Yield, step by step, the list of tokens decided at that step (one Event per still-running row).

        `sampling` may be one SamplingParams for all rows or one per row (each row draws from its own generator,
        seeded by its params). `cancelled(row)` is polled every step; a row for which it is true leaves the batch
        at once (finish_reason "cancelled"), so its compute stops. The rows run as one continuous batch
        (infer/batcher.py) whose pool holds exactly these prompts.
        """
        recur = recur or RecurParams()
        self.check(prompts, recur)
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        plan = DepthPlan.of(recur, self.cfg)
        need = self.cache_positions([len(prompt) + p.max_tokens for prompt, p in zip(prompts, params)])
        batch = ContinuousBatch(self, len(prompts), need, recur.kv, plan.depth, prefill_chunk=need)
        for b, (prompt, p) in enumerate(zip(prompts, params)):
            batch.add(Sequence(b, prompt, p, plan, new_generator(p.seed, self.device), recur.warm_start))
        test = None if cancelled is None else (lambda seq: cancelled(seq.id))
        # one autocast region for the whole generation: its cache keeps each weight's bf16 copy from the first
        # step on, instead of casting every weight again at every step (~20% of a decode step on CPU)
        with self._autocast():
            while batch.busy:
                yield batch.step(test)

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor,
              recur: RecurParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced scoring with per-token adaptive depth: (nll [B, T] in nats, depth [B, T], the argmax
        token at each position [B, T]).

        Position 0 comes from a one-token prefill (its depth is the prefill depth); every later position is a
        cached decode step that exits by the criterion, exactly as generation would.
        """
        plan = DepthPlan.of(recur, self.cfg)
        prefill_r = plan.prefill
        B, T = x.shape
        x, y = x.to(self.device), y.to(self.device)
        cache = KVCache(self.cfg, recur.kv, B, T, plan.depth, self.device, self.dtype.torch_dtype)
        rows, plans = torch.arange(B, device=self.device), RowPlans.same(plan, B, self.device)
        nll = torch.empty(B, T, device=self.device)
        depth = torch.empty(B, T, dtype=torch.long, device=self.device)
        top = torch.empty(B, T, dtype=torch.long, device=self.device)
        with self._autocast():
            logits, state = self._prefill(cache, x[:, :1], torch.ones(B, dtype=torch.long, device=self.device),
                                          prefill_r, plan.depth)
            d = torch.full((B,), prefill_r if self.model.recur else 0, device=self.device)
            for t in range(T):
                if t > 0:
                    pos = torch.full((B,), t, dtype=torch.long, device=self.device)
                    warm = state if recur.warm_start else None
                    logits, d, state = self._decode(cache, x[:, t], rows, pos, warm, plans)
                nll[:, t] = torch.nn.functional.cross_entropy(logits.float(), y[:, t], reduction="none")
                depth[:, t], top[:, t] = d, logits.argmax(dim=-1)
        return nll, depth, top

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None,
                 recur: RecurParams | None = None) -> list[Generation]:
        """Run `stream` to the end; a stop token ends its row and is not included in the output."""
        out = [Generation() for _ in prompts]
        for events in self.stream(prompts, sampling, recur):
            for ev in events:
                g = out[ev.row]
                if ev.finish_reason in ("stop", "cancelled"):
                    g.finish_reason = ev.finish_reason
                    continue
                g.tokens.append(ev.token)
                g.depths.append(ev.depth)
                if ev.finish_reason:
                    g.finish_reason = ev.finish_reason
        return out
