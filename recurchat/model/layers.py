"""Transformer building blocks: functional RMSNorm, rotary embeddings, GQA attention, the MLP, Block.

Two block families share these classes, chosen by ModelConfig fields: nanochat's (QK-norm, ReLU² MLP, torch's
default norm epsilon, pairs rotated by −θ) and Llama's (no QK-norm, SwiGLU of its own hidden size, the source's
norm epsilon, pairs rotated by +θ as transformers' `rotate_half` does), so an imported Llama-family checkpoint runs
through the same code as a trained one. Llama's RMSNorm gains in a block are folded into the linear that follows
them at import (interop/llama.py), which is exact: W·(g ⊙ n(x)) = (W·diag(g))·n(x).
Nothing here knows about recursion; `recurrent.py` composes these blocks. Exercised by `pytest tests/model`.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def eager_training() -> bool:
    """Gradients flow and nothing is being compiled: where the autograd Functions below (RMSNormFunction,
    RotaryFunction, ReluSquared) replace their plain expressions; inference and torch.compile (inductor fuses the
    expressions itself) keep the expressions."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Parameter-free RMSNorm: no gains to tune, and nothing for Muon/AdamW to disagree about. `eps` None is
    torch's default (the dtype's machine epsilon); an imported model passes its own. While gradients flow (eager
    training) it is RMSNormFunction; inference and torch.compile use F.rms_norm."""
    if eager_training():
        return RMSNormFunction.apply(x, torch.finfo(x.dtype).eps if eps is None else eps)
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class RMSNormFunction(torch.autograd.Function):
    """x · rsqrt(mean(x²) + eps) over the last dimension, in fp32 at least inside, with one saved output and the
    backward rstd · (g − y · mean(g · y)); in fp32 each side is two or three passes over x (F.rms_norm's composite
    version runs ~5 ops forward and ~8 backward on a CPU). A cpu-tiny eager training step, in-process A/B against
    F.rms_norm (2-core Xeon, AVX512): fp32 806 → 750 ms, bf16 435 → 400 ms. torch has no fused CPU kernel for it
    (aten::_fused_rms_norm is composite there); under torch.compile inductor fuses F.rms_norm itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == wide:  # one pass, no temporary
            mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1))
        else:
            mean_square = x.to(wide).square().mean(-1, keepdim=True)
        rstd = torch.rsqrt(mean_square.add_(eps))
        y = (x * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, rstd = ctx.saved_tensors
        if grad.dtype == rstd.dtype:  # three passes: a dot product, a fused multiply-subtract, a scale in place
            with torch.autocast(grad.device.type, enabled=False):  # a backward run under autocast: vecdot stays fp32
                mean = torch.linalg.vecdot(grad, y, dim=-1).unsqueeze(-1).div_(grad.size(-1))
            return torch.addcmul(grad, y, mean, value=-1).mul_(rstd), None
        mean = (grad * y).mean(-1, keepdim=True, dtype=rstd.dtype)
        return ((grad - y * mean) * rstd).to(grad.dtype), None


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0,
                  convention: str = "nanochat") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables shaped [1, seq_len, 1, head_dim/2] (broadcast over batch and heads). `llama` negates sin, which
    turns apply_rotary's rotation by −θ into transformers' rotation by +θ (same frequencies, same pairs)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    sin = -freqs.sin() if convention == "llama" else freqs.sin()
    return freqs.cos()[None, :, None, :], sin[None, :, None, :]


def window_mask(q_pos: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """Boolean [..., length] mask: a query at q_pos sees keys q_pos − window < j ≤ q_pos (window 0: all j ≤ q_pos)."""
    keys = torch.arange(length, device=q_pos.device)
    seen = keys <= q_pos[..., None]
    return seen & (keys > q_pos[..., None] - window) if window > 0 else seen


@functools.lru_cache(maxsize=16)
def prefill_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """window_mask for a block of `length` queries from position 0, built once per (length, window, device): every
    block of every iteration of a forward reads the same one (never written to)."""
    return window_mask(torch.arange(length, device=device), length, window)


# Longest sequence for which bf16 training attention runs as explicit matmuls (short_causal_attention) on a CPU.
# Measured fwd+bwd at B=8, 4 heads over 2 KV heads, head_dim 64, 2-core AVX-512 EPYC: T=256 4 ms vs 11 ms for
# torch's flash kernel, T=512 24 vs 38 ms, T=1024 124 vs 88 ms (and the [T, T] scores it keeps grow as T²).
SHORT_ATTENTION_LEN = 512


@functools.lru_cache(maxsize=16)
def causal_bias(length: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[groups·length, length] additive causal mask (0 on and below the diagonal, −inf above), the [length, length]
    mask stacked once per query head of a KV group; built once per shape and never written to."""
    seen = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~seen, float("-inf"))
    return bias.repeat(groups, 1)


# the custom ops' namespace is this module's name: the exported modeling file (interop/hf_export.py) carries this
# source too, and registers its own ops instead of redefining recurchat's in a process that has both
OP_NAMESPACE = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{OP_NAMESPACE}::causal_softmax", mutates_args=())
def causal_softmax(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """softmax(scores + causal_bias) over the last dimension, as one op the compiler does not look into: in a
    compiled bf16 training step inductor's own fused masked softmax over these scores is slower than aten's
    (short_causal_attention's forward and backward at cpu-tiny shape, 2-core Xeon: 6.6–6.8 ms a layer compiled
    with the softmax fused, 4.6–4.9 with this op; a compiled bf16 cpu-tiny training step, in-process A/B: 342 →
    317 ms). scores is [..., groups·T, T]."""
    return (scores + causal_bias(scores.size(-1), groups, scores.dtype, scores.device)).softmax(-1)


@causal_softmax.register_fake
def _causal_softmax_shape(scores: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.empty_like(scores)


@torch.library.custom_op(f"{OP_NAMESPACE}::softmax_backward", mutates_args=())
def softmax_backward(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The gradient of a last-dimension softmax given its output: causal_softmax's backward, also opaque."""
    return torch._softmax_backward_data(grad, probs, -1, probs.dtype)


@softmax_backward.register_fake
def _softmax_backward_shape(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(probs)


def _save_probs(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _causal_softmax_backward(ctx, grad: torch.Tensor):
    (probs,) = ctx.saved_tensors
    return softmax_backward(grad, probs), None


causal_softmax.register_autograd(_causal_softmax_backward, setup_context=_save_probs)


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention as two batched matmuls and a softmax, for bf16 training on a CPU, where
    torch's flash kernel (fp32 tiles, and a backward that recomputes them) is 1.6–2.7× slower up to
    SHORT_ATTENTION_LEN. The query heads of one KV group are stacked along the sequence, so each KV head is read by
    one matmul and never repeated. Scores and probabilities are bf16, as under autocast; the softmax accumulates in
    fp32 inside the kernel. q is [B, H, T, D], k and v [B, KV, T, D]."""
    B, H, T, D = q.shape
    groups = H // k.size(1)
    q = (q * D ** -0.5).reshape(B, k.size(1), groups * T, D)
    scores = q @ k.transpose(-1, -2)
    if torch.compiler.is_compiling():
        probs = causal_softmax(scores, groups)
    else:  # eagerly the mask is added in place
        probs = scores.add_(causal_bias(T, groups, q.dtype, q.device)).softmax(-1)
    return (probs @ v).view(B, H, T, D)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new query per row (a decode step) as two small batched matmuls and a softmax, the query
    heads of a KV group side by side so each KV head is read once. Compiled steps only: on a CPU torch's flash
    kernel spends ~22 µs on such a step at cpu-tiny shape, a fixed cost that is 12% of a compiled batch-1 decode
    step, and inductor fuses this into a third of that; run eagerly its six ops cost 27 µs against the kernel's 11.
    q is [B, H, 1, D], k and v [B, KV, L, D], mask [B, 1, 1, L] (True = attend)."""
    B, H, _, D = q.shape
    kv = k.size(1)
    scores = (q.reshape(B, kv, H // kv, D) * D ** -0.5) @ k.transpose(-1, -2)  # [B, KV, groups, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).reshape(B, H, 1, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension; x is [B, T, H, D]. While gradients flow
    (eager training) it is RotaryFunction; inference and torch.compile use the expression."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if eager_training():
        return RotaryFunction.apply(x, cos, sin)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1·cos + x2·sin, x2·cos − x1·sin) written into one new tensor: four ops, no temporaries, no cat."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :d]).addcmul_(x2, sin)
    torch.mul(x2, cos, out=out[..., d:]).addcmul_(x1, sin, value=-1)
    return out


class RotaryFunction(torch.autograd.Function):
    """apply_rotary with nothing saved but the tables: its backward is the rotation the other way (sin negated).
    Autograd's version of the expression keeps both halves of x and spends zero-filled slice gradients and a cat
    on them. A cpu-tiny eager training step, in-process A/B (2-core Xeon, AVX512): fp32 751 → 736 ms, bf16 404 →
    394 ms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate_halves(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rotate_halves(grad, cos, -sin), None, None


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and (qk_norm) QK-norm, by F.scaled_dot_product_attention.

    `kv_cache`, when given, is any object with `update(k, v) -> (k_all, v_all, attn_mask or None)` working on
    [B, H, T, D] tensors; it lets the inference engine own cache layout without this class knowing the strategy.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, qk_gain: bool = False, window: int = 0,
                 qk_norm: bool = True):
        super().__init__()
        # window > 0: a query sees only the last `window` positions (itself included)
        self.window, self.qk_norm = window, qk_norm
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(f"d_model={d_model}, n_head={n_head}, n_kv_head={n_kv_head} do not divide evenly")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.c_q = nn.Linear(d_model, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(n_head * self.head_dim, d_model, bias=False)
        # QK-norm caps a logit at sqrt(head_dim); a learned gain per head lets attention stay sharp over more keys
        # than training showed (a previous-token head otherwise leaks a share that grows with the context).
        self.q_gain = nn.Parameter(torch.ones(n_head)) if qk_gain else None
        self._fused: tuple[tuple, torch.Tensor] | None = None  # (the weights' versions, [Wq; Wk; Wv])

    def fused_qkv_weight(self) -> torch.Tensor:
        """[Wq; Wk; Wv] as one matrix, rebuilt whenever a weight was replaced or changed in place (an optimizer step
        or load_state_dict bumps its version), so it can never go stale. A leaf that "requires grad" only so that
        autocast caches its bf16 copy for the whole generation, as it does for parameters; nothing backpropagates
        through it (it is used with gradients off)."""
        # through _modules/_parameters: nn.Module.__getattr__ costs ~1 µs a lookup, and the inference runner checks
        # every layer before each compiled decode step (7 µs for cpu-tiny's six layers this way, 32 µs by attribute)
        mods = self._modules
        wq, wk = mods["c_q"]._parameters["weight"], mods["c_k"]._parameters["weight"]
        wv = mods["c_v"]._parameters["weight"]
        # a new dtype or device is new storage: the data pointers cover them
        key = (wq.data_ptr(), wq._version, wk.data_ptr(), wk._version, wv.data_ptr(), wv._version)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, torch.cat((wq, wk, wv)).detach().requires_grad_(True))
        return self._fused[1]

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cached: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, T, heads, head_dim], q and k rotated and (qk_norm) normalised. Three matmuls while
        gradients flow; otherwise (inference and eval, where a decode step is bound by the number of small ops) one
        matmul over the fused weight, and q and k — adjacent in its output — rotated and normalised as one tensor:
        one rotary and one norm instead of two each, the same arithmetic on every head.

        Under torch.compile the fused weight is read as it stands (tracing cannot check its versions), so a
        compiled graph uses it only for the inference engine's passes (`cached`: a KV cache is attached), whose
        runner refreshes every fused weight before each compiled run (RecurrentLM.refresh_fused_weights); inductor
        does not merge the three matmuls itself, and on a CPU each is a separate GEMM call (24 of a cpu-tiny decode
        step's 77)."""
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        fused = self.pass_qkv_weight(cached)
        if fused is None:
            q = apply_rotary(self.c_q(x).view(B, T, H, D), cos, sin)
            k = apply_rotary(self.c_k(x).view(B, T, KV, D), cos, sin)
            q, k = (norm(q), norm(k)) if self.qk_norm else (q, k)
            return q, k, self.c_v(x).view(B, T, KV, D)
        qkv = F.linear(x, fused)
        qk = apply_rotary(qkv[..., :(H + KV) * D].view(B, T, H + KV, D), cos, sin)
        q, k = (norm(qk) if self.qk_norm else qk).split([H, KV], dim=2)
        return q, k, qkv[..., (H + KV) * D:].view(B, T, KV, D)

    def pass_qkv_weight(self, cached: bool) -> torch.Tensor | None:
        """The fused QKV weight this pass projects with, or None for three matmuls (see project_qkv)."""
        if torch.is_grad_enabled():
            return None
        if not torch.compiler.is_compiling():
            return self.fused_qkv_weight()
        return self._fused[1] if cached and self._fused is not None else None

    @staticmethod
    def short_training_attention(q: torch.Tensor) -> bool:
        """Whether a causal block of queries runs short_causal_attention: bf16 training on a CPU up to
        SHORT_ATTENTION_LEN. Inference keeps torch's kernel, so prefill and decode agree with the cached tests."""
        return (torch.is_grad_enabled() and q.dtype == torch.bfloat16 and q.device.type == "cpu"
                and q.size(-2) <= SHORT_ATTENTION_LEN)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin, cached=kv_cache is not None)
        if self.q_gain is not None:
            q = q * self.q_gain.to(q.dtype)[:, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.n_kv_head != self.n_head
        mask = None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(k, v)  # mask None: a causal block starting at position 0 (prefill)
        if mask is None and self.window:
            mask = (window_mask(torch.arange(T, device=x.device), T, self.window) if torch.compiler.is_compiling()
                    else prefill_window_mask(T, self.window, x.device))
        if mask is None and self.short_training_attention(q):
            y = short_causal_attention(q, k, v)
        elif T == 1 and mask is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = single_query_attention(q, k, v, mask)
        else:
            # one query and no mask: a decode step that sees every cached key (a causal flag would align top-left)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class ReluSquared(torch.autograd.Function):
    """relu(x)² with one saved tensor and a two-op backward (2·relu(x)·grad): autograd's relu → square keeps the
    same tensor but spends a threshold_backward and a pow backward on it, ~2× the time of this on a CPU (eager fp32
    and bf16 at [2048, 1024]). torch has no fused relu² op; under torch.compile the plain expression is used and
    inductor fuses it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = x.clamp_min(0)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return ReluSquared.apply(x) if eager_training() else F.relu(x).square()


class MLP(nn.Module):
    """`relu2`: ReLU² feed-forward, cheap, and sparse activations train well at small scale. `swiglu`: Llama's
    down(silu(gate x) ⊙ up x), with gate and up stacked in one c_fc matrix [gate; up] (one matmul, like relu2)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "relu2"):
        super().__init__()
        self.kind = kind  # ModelConfig.validate checks it is one of config.MLP_KINDS
        self.c_fc = nn.Linear(d_model, (2 if kind == "swiglu" else 1) * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)).

    `sandwich`: Huginn's form, which also normalises after each residual add, x ← norm(x + f(norm(x))), so the
    output's scale is fixed however often the block is applied."""

    def __init__(self, cfg, sandwich: bool = False):
        """`cfg` is a ModelConfig (any object with its fields: interop/hf_modeling.py passes its own)."""
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.qk_gain, cfg.attn_window, cfg.qk_norm)
        self.mlp = MLP(cfg.d_model, cfg.mlp_width, cfg.mlp)
        self.sandwich = sandwich
        self.eps = cfg.norm_eps or None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None) -> torch.Tensor:
        eps = self.eps
        x = x + self.attn(norm(x, eps), cos, sin, kv_cache)
        if self.sandwich:
            x = norm(x, eps)
        x = x + self.mlp(norm(x, eps))
        return norm(x, eps) if self.sandwich else x
