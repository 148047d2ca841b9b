"""The naive sampler: recompute the whole (cropped) sequence for every new token, no KV cache.

It is the reference the cached engine (infer/engine.py) is checked against in tests and the baseline
`recurchat bench infer` measures cached decoding against. Exercise: `pytest tests/infer/test_engine.py`.
"""

from __future__ import annotations

import torch

from recurchat.infer.sampling import sample_next


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
