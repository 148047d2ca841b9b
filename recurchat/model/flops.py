"""FLOPs per token for a recursive model at a given r and number of gradient iterations, and MFU.

Accounting (the same numbers feed `metrics.jsonl` and `recurchat bench`):
- every use of a weight matrix with N parameters costs 2·N FLOPs per token forward; the prelude and coda once, the
  recurrent stack and adapter once per iteration, the lm_head once; embeddings are lookups (0);
- backward costs 4·N (input and weight gradients) only where gradients flow: prelude, coda, head, and the last
  g = min(k, r) iterations — the r − g no-grad iterations of truncated BPTT cost forward only;
- attention scores and values: 4·T·d_attn forward and 8·T·d_attn backward per layer use, T the full sequence length
  (what dense SDPA kernels compute; the PaLM/nanochat convention, 12·T·d per layer for a training step).
Norms, activations, softmax and the loss are not counted (they are not matmuls), like torch's FlopCounterMode.

Exercise: `pytest tests/model/test_flops.py` (checked against torch.utils.flop_counter.FlopCounterMode).
"""

from __future__ import annotations

from recurchat.config import ModelConfig


def block_matrix_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.d_model // cfg.n_head
    attn = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2  # q, proj; k, v
    return attn + cfg.mlp_params


def iterations(cfg: ModelConfig, num_recur: int | None) -> int:
    """r: `num_recur`, r̄ when None, and 0 for a standard model (it has no shared stack to iterate)."""
    return 0 if cfg.n_shared == 0 else cfg.mean_recur if num_recur is None else num_recur


def layer_uses(cfg: ModelConfig, iters: int) -> int:
    """Block applications per token at `iters` iterations: the prelude and coda once, the shared stack per iteration."""
    return cfg.n_prelude + cfg.n_coda + iters * cfg.n_shared


def matrix_params_used(cfg: ModelConfig, iters: int) -> int:
    """Weight-matrix parameters one token uses at `iters` iterations, counted once per use: the prelude and coda
    blocks once, the shared blocks and the adapter once per iteration, the head once (embeddings are lookups)."""
    adapter = {"concat": 2, "parcae": 1}.get(cfg.adapter, 0) * cfg.d_model * cfg.d_model if cfg.n_shared else 0
    once = (cfg.n_prelude + cfg.n_coda) * block_matrix_params(cfg)
    return once + iters * (cfg.n_shared * block_matrix_params(cfg) + adapter) + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, num_recur: int | None = None, grad_iters: int | None = None,
                    seq_len: int | None = None, backward: bool = True) -> float:
    """Training (or, with backward=False, inference) FLOPs per token.

    `grad_iters` defaults to all r iterations (full BPTT); pass min(k, r) for truncated BPTT.
    """
    r = iterations(cfg, num_recur)
    g = r if grad_iters is None else min(grad_iters, r)
    T = cfg.seq_len if seq_len is None else seq_len
    attn_fwd = 4 * T * cfg.n_head * (cfg.d_model // cfg.n_head)

    def per_pass(iters: int, matmul_factor: int, attn_factor: int) -> float:
        return matmul_factor * matrix_params_used(cfg, iters) + attn_factor * attn_fwd * layer_uses(cfg, iters)

    fwd = per_pass(r, 2, 1)
    return fwd + (per_pass(g, 4, 2) if backward else 0.0)


def decode_bytes_per_step(cfg: ModelConfig, rows: int, context: int, weight_bytes: int, kv_bytes: int,
                          num_recur: int | None = None) -> float:
    """Bytes a decode step of `rows` tokens at depth r reads: every weight matrix once per use (the prelude and coda
    once, the shared stack and adapter once per iteration, the head once; shared by all rows, streamed from memory
    as if no cache held them between uses), plus each row's keys and values over `context` positions in every
    layer it runs. `weight_bytes` / `kv_bytes`: bytes per element of the weights and of the KV cache."""
    r = iterations(cfg, num_recur)
    kv_per_row = layer_uses(cfg, r) * 2 * cfg.n_kv_head * (cfg.d_model // cfg.n_head) * context * kv_bytes
    return matrix_params_used(cfg, r) * weight_bytes + rows * kv_per_row


def mfu(flops_per_tok: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (measured: model/hardware.py)."""
    return flops_per_tok * tokens_per_s / peak_flops if peak_flops > 0 else 0.0
