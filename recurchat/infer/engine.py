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
- `stream()` yields the tokens of each step as they are decided (for the server); `generate()` collects them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from recurchat.config import ModelConfig
from recurchat.errors import UserError
from recurchat.infer.exit import ExitCriterion, ExitTracker
from recurchat.infer.kv_cache import KVCache, bytes_per_token, iteration_slots
from recurchat.infer.sampling import SamplingParams, sample_next
from recurchat.model.exit_gate import ExitGate
from recurchat.model.hardware import choose_dtype, inference_banner
from recurchat.model.recurrent import RecurrentLM


@dataclass
class RecurParams:
    num_recur: int | None = None  # fixed depth when `exit` is None (default r̄)
    exit: str | None = None  # e.g. "kl:1e-3": adaptive depth per token
    min_recur: int = 1
    max_recur: int | None = None  # cap for adaptive depth (default r_max)
    prefill_recur: int | None = None  # default: the fixed depth, or r̄ with an exit criterion
    warm_start: bool = False
    kv: str = "full"

    def validate(self, cfg: ModelConfig, limit: int | None = None) -> "RecurParams":
        """Check these settings against a model (and a deployment's depth `limit`) before any compute, raising
        RecurError that names the field. The CLI, the server and the eval sweep all call this."""
        if self.num_recur is not None and self.exit:
            raise RecurError("give a fixed depth (num_recur) or an exit criterion (exit), not both", "num_recur")
        for name in ("num_recur", "min_recur", "max_recur", "prefill_recur"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecurError(f"{name} must be >= 1, got {value}", name)
            if value is not None and limit is not None and value > limit:
                raise RecurError(f"{name}={value} exceeds the limit of {limit}", name)
        if self.exit:
            try:
                crit = ExitCriterion.parse(self.exit)
            except UserError as e:
                raise RecurError(str(e), "exit") from None
            if crit.kind == "fixed" and limit is not None and crit.value > limit:
                raise RecurError(f"exit {self.exit!r} exceeds the limit of {limit}", "exit")
        if self.min_recur > (self.max_recur or self.num_recur or cfg.r_max):
            raise RecurError("min_recur exceeds the maximum depth", "min_recur")
        fixed = self.num_recur or cfg.mean_recur
        if self.kv.startswith("ring:") and (self.exit or self.prefill_recur not in (None, fixed)):
            # Slot s of a ring serves every iteration ≡ s (mod K). Once a token stops at iteration j, a later token
            # at i < j should read iteration i and one at i ≥ j iteration j − 1, often from the same slot.
            raise RecurError("ring:K keeps the last K iterations of tokens that all run the same depth: use it "
                             "with a fixed depth, and full or last with an exit criterion", "kv")
        try:
            iteration_slots(self.kv, limit or cfg.r_max)
        except UserError as e:
            raise RecurError(str(e), "kv") from None
        return self


class RecurError(UserError):
    """A recursion setting no engine can run; `param` names the RecurParams field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class Event:
    row: int
    token: int
    depth: int
    finish_reason: str | None = None  # "stop" | "length" when this was the row's last event


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def mean_depth(self) -> float:
        return sum(self.depths) / len(self.depths) if self.depths else 0.0


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

    @property
    def size(self) -> int:
        return self.local.numel()

    def keep(self, mask: torch.Tensor, cache: KVCache) -> None:
        self.local, self.e, self.s = self.local[mask], self.e[mask], self.s[mask]
        self.cos, self.sin, self.rows, self.pos = self.cos[mask], self.sin[mask], self.rows[mask], self.pos[mask]
        self.view = cache.rows(self.rows, self.pos)


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

    def _autocast(self):
        return self.dtype.autocast(self.device)

    def describe(self) -> str:
        """The banner line: device, dtype and why, threads, the measured peak of this model's matmuls."""
        return inference_banner(self.device, self.dtype, self.cfg)

    def _plan(self, recur: RecurParams) -> tuple[ExitCriterion, int, int, int]:
        cfg = self.cfg
        if recur.exit:
            crit = ExitCriterion.parse(recur.exit)
            max_steps = recur.max_recur or cfg.r_max
            if crit.kind == "fixed":
                max_steps = min(max_steps, int(crit.value))
            prefill = recur.prefill_recur or min(cfg.mean_recur, max_steps)
        else:
            r = recur.num_recur or cfg.mean_recur
            crit, max_steps, prefill = ExitCriterion("fixed", r), r, recur.prefill_recur or r
        if max_steps < 1 or recur.min_recur < 1 or prefill < 1:
            raise UserError("recursion depths must be >= 1")
        return crit, max(1, min(recur.min_recur, max_steps)), max_steps, max(prefill, 1)

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
                warm: torch.Tensor | None, crit: ExitCriterion, min_steps: int, max_steps: int):
        """One token for each of `rows`; returns logits [n, V], depths [n], final states [n, 1, d]."""
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
        act = ActiveRows(torch.arange(n, device=self.device), x, m.initial_state(x) if warm is None else warm,
                         cos, sin, rows, pos, view)
        tracker = ExitTracker(crit, n, self.device, self.exit_gate, act.s[:, -1])
        first_check = max(1, min_steps - 1)  # kl/entropy/latent/argmax compare with the previous iteration
        for i in range(max_steps):
            step = i + 1
            act.s = m.iterate(act.e, act.s, act.cos, act.sin, cache.recur(i, act.view))
            self.iterations += act.size
            if step >= max_steps:
                done, logits = torch.ones(act.size, dtype=torch.bool, device=self.device), None
            elif step >= first_check and crit.kind != "fixed":
                done, logits = self._check_exit(act, cache, tracker, crit, step, min_steps)
            else:
                continue
            if not bool(done.any()):
                continue
            self._retire(act, done, logits, cache, out, step, max_steps)
            if bool(done.all()):
                break
            act.keep(~done, cache)
            tracker.keep(~done)
        if bool(out.headless.any()):
            # one coda + head pass for every row that stopped without logits, whatever its depth: on a
            # memory-bound step a pass per exit depth would read the coda's and the head's weights once per depth
            at = out.headless.nonzero().squeeze(1)
            hidden = m.run_coda(out.state[at], cos[at], sin[at], cache.coda(cache.rows(rows[at], pos[at])))
            out.logits[at] = m.head(hidden)[:, -1].float()
        return out.logits, out.depth, out.state

    def _check_exit(self, act: ActiveRows, cache: KVCache, tracker: ExitTracker, crit: ExitCriterion, step: int,
                    min_steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows that stop now, their logits when the criterion had to run the head for every row)."""
        logits = None
        if crit.needs_logits:
            logits = self.model.head(self.model.run_coda(act.s, act.cos, act.sin, cache.coda(act.view)))[:, -1]
        done = tracker.update(step, act.s[:, -1], logits) & (step >= min_steps)
        if crit.needs_logits:
            self.extra_heads += int((~done).sum())
        return done, logits

    def _retire(self, act: ActiveRows, done: torch.Tensor, logits: torch.Tensor | None, cache: KVCache,
                out: DecodeOut, step: int, max_steps: int) -> None:
        """Write the output of the rows that stop at `step` and fill their K/V forward for deeper readers. Rows
        without logits (the criterion did not run the head) get theirs after the loop, all in one pass."""
        ex = act.local[done]
        if logits is None:  # the coda has not run on this state yet (its K/V for this position too)
            out.headless[ex] = True
        else:
            out.logits[ex] = logits[done].float()
        out.state[ex] = act.s[done].to(out.state.dtype)
        out.depth[ex] = step
        cache.fill_forward(act.rows[done], act.pos[done], step, max_steps)

    # -- public API ---------------------------------------------------------------------------------------------

    def cache_positions(self, reach: list[int]) -> int:
        """Positions the KV cache of a batch holds: the farthest any row can reach (prompt + max_tokens; its last
        token is sampled, never decoded), capped at the context."""
        return min(self.cfg.seq_len, max(reach))

    def cache_bytes(self, reach: list[int], recur: RecurParams) -> int:
        """Bytes of the KV cache `stream` allocates for rows that reach `reach` positions under `recur` (one
        cache per batch: rows × the farthest reach × the bytes of one token at the plan's deepest iteration)."""
        _, _, max_steps, prefill_r = self._plan(recur)
        per_token = bytes_per_token(self.cfg, recur.kv, max(max_steps, prefill_r), self.dtype.torch_dtype)
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

        `sampling` may be one SamplingParams for all rows or one per row (the server batches requests that each
        bring their own temperature, max_tokens, stop tokens and seed). `cancelled(row)` is polled every step; a
        row for which it is true leaves the batch at once (finish_reason "cancelled"), so its compute stops.
        """
        recur = recur or RecurParams()
        self.check(prompts, recur)
        ctx = self.cfg.seq_len
        B = len(prompts)
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * B
        if len(params) != B:
            raise ValueError(f"{len(params)} sampling params for {B} prompts")
        crit, min_steps, max_steps, prefill_r = self._plan(recur)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        idx = torch.zeros(B, int(lens.max()), dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            idx[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        need = self.cache_positions([len(prompt) + p.max_tokens for prompt, p in zip(prompts, params)])
        cache = KVCache(self.cfg, recur.kv, B, need, max(max_steps, prefill_r), self.device, self.dtype.torch_dtype)
        # a request without a seed gets a fresh one from the OS: the process-wide torch RNG is never reseeded
        gens = [torch.Generator(device=self.device).manual_seed(p.seed if p.seed is not None else
                                                                secrets.randbits(63)) for p in params]
        # one autocast region for the whole generation: its cache keeps each weight's bf16 copy from the first
        # step on, instead of casting every weight again at every step (~20% of a decode step on CPU)
        with self._autocast():
            logits, state = self._prefill(cache, idx, lens, prefill_r, max(max_steps, prefill_r))
            depth = torch.full((B,), prefill_r if self.model.recur else 0, dtype=torch.long, device=self.device)
            rows = torch.arange(B, device=self.device)
            pos = lens.clone()
            produced = [0] * B
            uniform = all(p == params[0] for p in params)
            while rows.numel():
                row_list = rows.tolist()
                if uniform:
                    p = params[0]
                    tok = sample_next(logits, p.temperature, p.top_k, gens[0], p.top_p)
                else:
                    tok = torch.cat([sample_next(logits[j:j + 1], params[r].temperature, params[r].top_k, gens[r],
                                                 params[r].top_p) for j, r in enumerate(row_list)])
                events, keep = [], []
                for j, (row, t, d) in enumerate(zip(row_list, tok.tolist(), depth.tolist())):
                    produced[row] += 1
                    p, reason = params[row], None
                    if cancelled is not None and cancelled(row):
                        reason = "cancelled"
                    elif t in p.stop_ids:
                        reason = "stop"
                    elif produced[row] >= p.max_tokens or int(pos[j]) >= ctx:
                        reason = "length"
                    events.append(Event(row, t, d, reason))
                    keep.append(reason is None)
                yield events
                keep_t = torch.tensor(keep, dtype=torch.bool, device=self.device)
                if not keep_t.any():
                    break
                rows, pos, tok = rows[keep_t], pos[keep_t], tok[keep_t]
                warm = state[keep_t] if (recur.warm_start and state is not None) else None
                logits, depth, state = self._decode(cache, tok, rows, pos, warm, crit, min_steps, max_steps)
                pos = pos + 1

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor, recur: RecurParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced scoring with per-token adaptive depth: (nll [B, T] in nats, depth [B, T]).

        Position 0 comes from a one-token prefill (its depth is the prefill depth); every later position is a
        cached decode step that exits by the criterion, exactly as generation would.
        """
        crit, min_steps, max_steps, prefill_r = self._plan(recur)
        B, T = x.shape
        x, y = x.to(self.device), y.to(self.device)
        cache = KVCache(self.cfg, recur.kv, B, T, max(max_steps, prefill_r), self.device, self.dtype.torch_dtype)
        rows = torch.arange(B, device=self.device)
        nll = torch.empty(B, T, device=self.device)
        depth = torch.empty(B, T, dtype=torch.long, device=self.device)
        with self._autocast():
            logits, state = self._prefill(cache, x[:, :1], torch.ones(B, dtype=torch.long, device=self.device),
                                          prefill_r, max(max_steps, prefill_r))
            d = torch.full((B,), prefill_r if self.model.recur else 0, device=self.device)
            for t in range(T):
                if t > 0:
                    pos = torch.full((B,), t, dtype=torch.long, device=self.device)
                    warm = state if recur.warm_start else None
                    logits, d, state = self._decode(cache, x[:, t], rows, pos, warm, crit, min_steps, max_steps)
                nll[:, t] = torch.nn.functional.cross_entropy(logits.float(), y[:, t], reduction="none")
                depth[:, t] = d
        return nll, depth

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
