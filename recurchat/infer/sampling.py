"""Choosing the next token: per-request sampling settings and the sampler (greedy, temperature, top-k, top-p).

Used by the cached engine and the naive reference alike. Exercised by `pytest tests/infer/test_engine.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample_next` draws from, [..., V] → [..., V]: temperature, then top-k, then nucleus (top-p)
    filtering; temperature 0 is a one-hot on the argmax (speculative sampling compares these distributions)."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None,
                top_p: float = 1.0) -> torch.Tensor:
    """One token id per row from [B, V] logits; temperature 0 is greedy; top-k then nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def finish_reason(token: int, params: SamplingParams, produced: int, pos: int, ctx: int) -> str | None:
    """Why a row ends with `token`, its `produced`-th, to be fed at position `pos` of a `ctx`-token context: "stop"
    (a stop token: not part of the output), "length" (max_tokens or the context reached), or None: it goes on."""
    if token in params.stop_ids:
        return "stop"
    if produced >= params.max_tokens or pos >= ctx:
        return "length"
    return None
