"""Self-speculative decoding by loop count: the same weights draft k tokens at a shallow depth, then one chunked
forward at the target depth checks them all; the longest agreeing prefix is kept, plus the target's own next token.

    recurchat sample --ckpt runs/tiny -p "In the beginning" --recur 4 --speculate 1:4 --temperature 0

Greedy only: every kept token is the target depth's argmax given the tokens before it, so the output is exactly
fixed-depth greedy decoding (tested), whatever the draft proposes. One row; the `full` cache, whose per-iteration
slots let a draft write iterations 0..d−1 of a position that verification then rewrites at every iteration.
Exercised by `pytest tests/infer/test_speculative.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.exit import ExitCriterion
from recurchat.infer.kv_cache import KVCache


@dataclass
class Speculation:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, kept
    rounds: int = 0  # verification forwards

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def parse_speculate(spec: str) -> tuple[int, int]:
    """"DRAFT_R:K" → (draft depth, tokens per draft)."""
    try:
        draft_r, k = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"bad --speculate {spec!r}: expected DRAFT_R:K, e.g. 1:4") from None
    if draft_r < 1 or k < 1:
        raise UserError(f"bad --speculate {spec!r}: DRAFT_R and K must be >= 1")
    return draft_r, k


def draft(engine: Engine, cache: KVCache, last: int, pos: int, k: int, draft_r: int) -> list[int]:
    """k greedy tokens at depth `draft_r`, starting by feeding `last` at `pos`."""
    one, out = torch.zeros(1, dtype=torch.long, device=engine.device), []
    crit = ExitCriterion("fixed", draft_r)
    for i in range(k):
        tok = torch.tensor([last if i == 0 else out[-1]], device=engine.device)
        logits, _, _ = engine._decode(cache, tok, one, torch.tensor([pos + i], device=engine.device), None, crit,
                                      1, draft_r)
        out.append(int(logits[0].argmax()))
    return out


@torch.no_grad()
def generate_speculative(engine: Engine, prompt: list[int], max_tokens: int, num_recur: int, draft_r: int, k: int,
                         stop_ids: tuple[int, ...] = ()) -> Speculation:
    """Greedy decoding at depth `num_recur`, drafted `k` tokens at a time at depth `draft_r` (see module doc)."""
    cfg = engine.cfg
    if not cfg.recursive or not 1 <= draft_r < num_recur:
        raise UserError(f"speculation needs a recursive model and 1 <= DRAFT_R < the target depth {num_recur}")
    engine.check([prompt], RecurParams(num_recur=num_recur))
    need = min(cfg.seq_len, len(prompt) + max_tokens + k + 1)
    cache = KVCache(cfg, "full", 1, need, num_recur, engine.device, engine.dtype.torch_dtype)
    out = Speculation()
    with engine._autocast():
        logits, _ = engine._prefill(cache, torch.tensor([prompt], device=engine.device),
                                    torch.tensor([len(prompt)], device=engine.device), num_recur, num_recur)
        last, pos = int(logits[0].argmax()), len(prompt)  # `last` is decided, its K/V not yet in the cache
        while True:
            if last in stop_ids:
                out.finish_reason = "stop"
                return out
            out.tokens.append(last)
            if len(out.tokens) >= max_tokens or pos >= cfg.seq_len:
                return out
            n = min(k, max_tokens - len(out.tokens), need - pos - 1)
            proposed = draft(engine, cache, last, pos, n, draft_r) if n > 0 else []
            chunk = torch.tensor([[last, *proposed]], device=engine.device)
            target = engine._chunk(cache, chunk, pos, num_recur)[0][0].argmax(-1).tolist()  # next token at each
            agree = next((i for i, (d, t) in enumerate(zip(proposed, target)) if d != t), len(proposed))
            out.drafted, out.accepted, out.rounds = out.drafted + len(proposed), out.accepted + agree, out.rounds + 1
            for tok in proposed[:agree]:
                if tok in stop_ids:
                    out.finish_reason = "stop"
                    return out
                out.tokens.append(tok)
                if len(out.tokens) >= max_tokens:
                    return out
            last, pos = target[agree], pos + agree + 1

