"""Batched generation for recursive models: prefill, KV-cached decode, per-row early exit that saves compute.

    recurchat chat --ckpt runs/tiny --exit kl:1e-3 -p "In the beginning"

The passes themselves (chunk/prefill, decode with exits) are the model runner's (infer/runner.py); the engine checks
requests, streams and collects generations, and scores teacher-forced sequences on them.

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

import torch

from recurchat.checkpoint import Checkpoint, load_exit_gate
from recurchat.errors import UserError
from recurchat.infer.batcher import ContinuousBatch, Event, Generation, Sequence, new_generator
from recurchat.infer.kv_cache import KVCache, bytes_per_token
from recurchat.infer.plan import DepthPlan, RecurError, RecurParams, RowPlans
from recurchat.infer.runner import Runner
from recurchat.infer.sampling import SamplingParams
from recurchat.model.exit_gate import ExitGate
from recurchat.model.recurrent import RecurrentLM

__all__ = ["Engine", "Event", "Generation", "RecurError", "RecurParams"]  # what callers import from here


class Engine:
    """Checks, generation and scoring on a Runner (infer/runner.py), which owns the model and its passes."""

    def __init__(self, model: RecurrentLM, dtype: str = "auto", exit_gate: ExitGate | None = None,
                 compile: bool = False, decode_rows: int | None = None):
        """`dtype`: auto | bf16 | fp32, resolved for the model's device by model/hardware.py (bf16 = autocast).
        `exit_gate`: the checkpoint's learned gate (checkpoint.load_exit_gate), which the gate:P criterion needs.
        `compile`: fixed-depth decode steps run compiled (Runner). `decode_rows`: the batch this engine mostly
        decodes (sample: its samples, chat: 1, serve: --max-batch), which a compiled engine's `auto` weighs
        (model/hardware.py)."""
        self.runner = Runner(model, dtype, exit_gate, compile, decode_rows)
        self.model, self.cfg, self.device = self.runner.model, self.runner.cfg, self.runner.device
        self.dtype, self.exit_gate = self.runner.dtype, self.runner.exit_gate

    @classmethod
    def for_checkpoint(cls, ckpt: Checkpoint, model: RecurrentLM, dtype: str = "auto",
                       compile: bool = False, decode_rows: int | None = None) -> "Engine":
        """The engine for a loaded checkpoint (checkpoint.load_model), with the exit gate trained for it, if any."""
        return cls(model, dtype=dtype, exit_gate=load_exit_gate(ckpt.path), compile=compile, decode_rows=decode_rows)

    def describe(self) -> str:
        """The banner line: device, dtype and why, threads, the measured peak of this model's matmuls."""
        return self.runner.describe()

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
        batch = ContinuousBatch(self.runner, len(prompts), need, recur.kv, plan.depth, prefill_chunk=need)
        for b, (prompt, p) in enumerate(zip(prompts, params)):
            batch.add(Sequence(b, prompt, p, plan, new_generator(p.seed, self.device), recur.warm_start))
        test = None if cancelled is None else (lambda seq: cancelled(seq.id))
        # every pass runs inside batch.step, which turns gradients off (not this generator: torch.no_grad on a
        # generator re-enters at every step, ~5 µs of a ~1.4 ms compiled batch-1 token)
        # one autocast region for the whole generation: its cache keeps each weight's bf16 copy from the first
        # step on, instead of casting every weight again at every step (~20% of a decode step on CPU)
        with self.runner.autocast():
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
        with self.runner.autocast():
            logits, state = self.runner.prefill(cache, x[:, :1], torch.ones(B, dtype=torch.long, device=self.device),
                                          prefill_r, plan.depth)
            d = torch.full((B,), prefill_r if self.model.recur else 0, device=self.device)
            for t in range(T):
                if t > 0:
                    pos = torch.full((B,), t, dtype=torch.long, device=self.device)
                    warm = state if recur.warm_start else None
                    logits, d, state = self.runner.decode(cache, x[:, t], rows, pos, warm, plans)
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
