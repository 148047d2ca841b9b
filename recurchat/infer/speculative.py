"""Self-speculative decoding by loop count: the same weights draft K tokens at a shallow depth, then one chunked
forward at the target depth checks them all, for every row of a batch at once.

    recurchat sample --ckpt runs/tiny -p "In the beginning" --recur 4 --speculate 1:4 [--temperature 0.8]

Acceptance is speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token x, drawn from the draft
distribution q, is kept with probability min(1, p(x)/q(x)) under the target distribution p; at the first rejection
the row takes a token from normalise(max(p − q, 0)) instead, and when all K are kept it takes one from p after them.
Every emitted token is then distributed exactly as fixed-depth sampling from p would give it (tested), with the
row's temperature, top-k and top-p applied to both p and q. With temperature 0 both are one-hot on their argmax, so
this is the longest agreeing prefix plus the target's own token: the output is fixed-depth greedy decoding exactly
(in fp32; tested). Rows keep their own positions: each verifies a chunk that starts where it stands (the KV cache's
per-row chunk mode). The `full` cache, whose per-iteration slots let a draft write iterations 0..d−1 of a position
that verification then rewrites at every iteration.
Exercised by `pytest tests/infer/test_speculative.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recurchat.errors import UserError
from recurchat.infer.batcher import new_generator
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.exit import ExitCriterion
from recurchat.infer.kv_cache import KVCache
from recurchat.infer.plan import DepthPlan, RowPlans
from recurchat.infer.sampling import SamplingParams, finish_reason, next_token_probs


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

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verification forward (at most K + 1); the first token comes from the prefill, and a
        continuation that stops there has no rounds (0)."""
        return (len(self.tokens) - 1) / self.rounds if self.rounds else 0.0


def parse_speculate(spec: str) -> tuple[int, int]:
    """"DRAFT_R:K" → (draft depth, tokens per draft)."""
    try:
        draft_r, k = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"bad --speculate {spec!r}: expected DRAFT_R:K, e.g. 1:4") from None
    if draft_r < 1 or k < 1:
        raise UserError(f"bad --speculate {spec!r}: DRAFT_R and K must be >= 1")
    return draft_r, k


class Rows:
    """The rows still decoding: cache row, position of the decided-but-uncached token `last`, their sampling."""

    def __init__(self, params: list[SamplingParams], gens: list[torch.Generator], device: torch.device):
        self.params, self.gens, self.device = params, gens, device
        self.uniform = all(p == params[0] for p in params)

    def probs(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Each row's sampling distribution from its logits [n, ..., V]."""
        if self.uniform:
            p = self.params[0]
            return next_token_probs(logits, p.temperature, p.top_k, p.top_p)
        return torch.stack([next_token_probs(logits[j], self.params[r].temperature, self.params[r].top_k,
                                             self.params[r].top_p) for j, r in enumerate(rows)])

    def draw(self, probs: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """One token per row from its distribution [n, V] and its own generator (argmax when greedy)."""
        return torch.stack([probs[j].argmax() if self.params[r].temperature <= 0 else
                            torch.multinomial(probs[j], 1, generator=self.gens[r])[0] for j, r in enumerate(rows)])


def draft(engine: Engine, cache: KVCache, rows: torch.Tensor, last: torch.Tensor, pos: torch.Tensor, k: int,
          draft_r: int, sampling: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, k], their draft distributions [n, k, V]): k tokens per row at depth `draft_r`, feeding `last` at
    `pos` first."""
    plans = RowPlans.same(DepthPlan(ExitCriterion("fixed", draft_r), 1, draft_r, draft_r), rows.numel(), rows.device)
    row_list, tokens, dists = rows.tolist(), [], []
    for i in range(k):
        logits, _, _ = engine.runner.decode(cache, last if i == 0 else tokens[-1], rows, pos + i, None, plans)
        dists.append(sampling.probs(logits.float(), row_list))
        tokens.append(sampling.draw(dists[-1], row_list))
    return torch.stack(tokens, dim=1), torch.stack(dists, dim=1)


def accept(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, rows: list[int],
           sampling: Rows) -> tuple[list[int], list[int]]:
    """Speculative sampling per row (see the module doc): (drafted tokens kept, the token that follows them).
    p [n, K+1, V] target distributions, q [n, K, V] draft distributions, drafted [n, K]."""
    kept, follow = [], []
    K = drafted.size(1)
    for j, r in enumerate(rows):
        x = drafted[j]
        ratio = p[j, torch.arange(K), x] / q[j, torch.arange(K), x]
        u = torch.rand(K, generator=sampling.gens[r], device=p.device)
        rejected = (u >= ratio).nonzero()
        n = int(rejected[0]) if rejected.numel() else K
        dist = p[j, n]
        if n < K and sampling.params[r].temperature > 0:
            residual = (p[j, n] - q[j, n]).clamp_min(0)
            dist = residual if float(residual.sum()) > 0 else dist
        kept.append(n)
        follow.append(int(dist.argmax()) if sampling.params[r].temperature <= 0 else
                      int(torch.multinomial(dist / dist.sum(), 1, generator=sampling.gens[r])))
    return kept, follow


def emit(out: Speculation, tokens: list[int], params: SamplingParams, pos: int, ctx: int) -> bool:
    """Append decided tokens to a row's output until a stop token, max_tokens or the context; True if it goes on."""
    for i, tok in enumerate(tokens):
        reason = finish_reason(tok, params, len(out.tokens) + 1, pos + i, ctx)
        if reason != "stop":
            out.tokens.append(tok)
        if reason is not None:
            out.finish_reason = reason
            return False
    return True


def check(engine: Engine, prompts: list[list[int]], num_recur: int, draft_r: int) -> None:
    if not engine.cfg.recursive or not 1 <= draft_r < num_recur:
        raise UserError(f"speculation needs a recursive model and 1 <= DRAFT_R < the target depth {num_recur}")
    engine.check(prompts, RecurParams(num_recur=num_recur))


@torch.no_grad()
def speculate(engine: Engine, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams],
              num_recur: int, draft_r: int, k: int) -> list[Speculation]:
    """Decode every prompt at depth `num_recur`, drafted `k` tokens at a time at depth `draft_r` (see the module
    doc); `sampling` is one SamplingParams for all rows or one per row."""
    check(engine, prompts, num_recur, draft_r)
    cfg, dev, B = engine.cfg, engine.device, len(prompts)
    params = sampling if isinstance(sampling, list) else [sampling] * B
    need = min(cfg.seq_len, max(len(p) + s.max_tokens for p, s in zip(prompts, params)) + k + 1)
    cache = KVCache(cfg, "full", B, need, num_recur, dev, engine.dtype.torch_dtype)
    gens = [new_generator(p.seed, dev) for p in params]
    rowset, out = Rows(params, gens, dev), [Speculation() for _ in prompts]
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    idx = torch.zeros(B, int(lens.max()), dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    with engine.runner.autocast():
        logits, _ = engine.runner.prefill(cache, idx, lens, num_recur, num_recur)
        last = [int(t) for t in rowset.draw(rowset.probs(logits.float(), list(range(B))), list(range(B)))]
        going, pos = list(range(B)), lens.tolist()  # `last[b]` is decided, its K/V not yet in the cache
        while True:
            going = [b for b in going if emit(out[b], [last[b]], params[b], pos[b], cfg.seq_len)]
            if not going:
                return out
            n = min(k, need - 1 - max(pos[b] for b in going))
            rows, at = torch.tensor(going, device=dev), torch.tensor([pos[b] for b in going], device=dev)
            first = torch.tensor([last[b] for b in going], device=dev)
            drafted, q = draft(engine, cache, rows, first, at, n, draft_r, rowset) if n > 0 else \
                (torch.zeros(len(going), 0, dtype=torch.long, device=dev), None)
            logits, _ = engine.runner.chunk(cache, torch.cat((first[:, None], drafted), dim=1), at, num_recur, rows)
            p = rowset.probs(logits.float(), going)
            kept, follow = accept(p, q, drafted, going, rowset) if n > 0 else ([0] * len(going), None)
            if follow is None:
                follow = [int(t) for t in rowset.draw(p[:, 0], going)]
            still = []
            for j, b in enumerate(going):
                o = out[b]
                o.drafted, o.accepted, o.rounds = o.drafted + n, o.accepted + kept[j], o.rounds + 1
                if emit(o, drafted[j, :kept[j]].tolist(), params[b], pos[b] + 1, cfg.seq_len):
                    still.append(b)
                last[b], pos[b] = follow[j], pos[b] + kept[j] + 1
            going = still
