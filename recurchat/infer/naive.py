"""The naive sampler: recompute the whole (cropped) sequence for every new token, no KV cache.

It is the reference the cached engine is checked and benchmarked against, and what `recurchat sample` uses until
the engine exists. Exercise: `recurchat sample --ckpt runs/tiny -p "In the beginning"`.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None,
                top_p: float = 1.0) -> torch.Tensor:
    """One token id per row from [B, V] logits; temperature 0 is greedy; top-k then nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_naive(model: torch.nn.Module, prompt: list[int], max_tokens: int, num_recur: int | None = None,
                   temperature: float = 0.8, top_k: int = 50, seed: int = 0,
                   stop_ids: tuple[int, ...] = ()) -> list[int]:
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    ctx = model.cfg.seq_len
    for _ in range(max_tokens):
        logits = model(ids[:, -ctx:], num_recur=num_recur)[:, -1, :]
        nxt = sample_next(logits, temperature, top_k, gen)
        tok = int(nxt)
        if tok in stop_ids:
            break
        out.append(tok)
        ids = torch.cat((ids, nxt.view(1, 1)), dim=1)
    return out
