"""The recursive language model: prelude once, a shared recurrent stack r times, coda once.

    tokens → embed → prelude (P blocks) → e
    s₀ = init(e);  for i in 1..r:  s_i = recur_blocks(adapter(e, s_{i-1}))   (then norm(s_i) with state_norm)
    s_r → coda (C blocks) → norm → lm_head → soft-capped logits

This file is the one place recursion logic lives. The standard (non-recursive) model is the same class with
n_shared = 0, so recursive-vs-standard comparisons differ in one config field, never in two code paths.
Truncated BPTT: the first r−k iterations run under torch.no_grad(), the last min(k, r) with gradients.

Exercise: `pytest tests/model/test_recurrent.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recurchat.config import ModelConfig
from recurchat.model.head_loss import head_cross_entropy, softcapped
from recurchat.model.layers import Block, norm, rotary_tables


class Adapter(nn.Module):
    """Mixes the prelude output e into the recurrent state s at every iteration.

    `concat`: Linear(2d → d) on [e, s], whose starting weight is `init` (config.ADAPTER_INITS): `e` = [I | 0], every
    iteration starts by reading e alone (so at init r does nothing); `s` = [0 | I], the state alone (an unrolled deep
    net fed e once, through s₀); `mean` = [I/2 | I/2]; `random` = uniform with std 1/sqrt(2d). `add`: e + s, no
    parameters. `parcae`: Parcae's constrained injection (Prairie et al., arXiv 2604.12946), Ā ⊙ s + Δ ⊙ (B e) with
    Ā = exp(−Δ ⊙ exp(log_a)) and Δ = softplus(dt) per channel, so the linear part of the loop is a contraction
    (0 < Ā < 1) whatever the weights; B starts as I, Ā as e^{−1}, and `init` does not apply.
    """

    def __init__(self, d_model: int, kind: str, init: str = "e"):
        super().__init__()
        self.kind, self.init = kind, init
        self.proj = nn.Linear(2 * d_model, d_model, bias=False) if kind == "concat" else None
        if kind == "parcae":
            self.inject = nn.Linear(d_model, d_model, bias=False)  # B
            self.log_a = nn.Parameter(torch.zeros(d_model))
            self.dt = nn.Parameter(torch.zeros(d_model))

    def carry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ā, Δ) of the parcae injection."""
        delta = F.softplus(self.dt + math.log(math.e - 1))  # Δ = 1 at dt = 0
        return torch.exp(-delta * self.log_a.exp()), delta

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.kind == "parcae":
            self.inject.weight.copy_(torch.eye(self.inject.out_features))
            self.log_a.zero_()
            self.dt.zero_()
            return
        if self.proj is None:
            return
        d, w = self.proj.out_features, self.proj.weight
        if self.init == "random":
            bound = math.sqrt(3.0 / (2 * d))
            nn.init.uniform_(w, -bound, bound)
            return
        w.zero_()
        e_part, s_part = {"e": (1.0, 0.0), "s": (0.0, 1.0), "mean": (0.5, 0.5)}[self.init]
        w[:, :d].copy_(torch.eye(d) * e_part)
        w[:, d:].copy_(torch.eye(d) * s_part)

    def forward(self, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "parcae":
            a_bar, delta = self.carry()
            return a_bar.to(s.dtype) * s + delta.to(e.dtype) * self.inject(e)
        if self.proj is None:
            return e + s
        return self.proj(torch.cat((e, s), dim=-1))


class RecurrentLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        d = cfg.d_model

        def blocks(n: int, sandwich: bool = False) -> nn.ModuleList:
            return nn.ModuleList(Block(cfg, sandwich) for _ in range(n))

        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.prelude, self.coda = blocks(cfg.n_prelude), blocks(cfg.n_coda)
        self.recur = blocks(cfg.n_shared, cfg.sandwich_norm)
        # every attention layer, listed once: refresh_fused_weights runs before each compiled inference step
        self.attention_layers = tuple(block.attn for block in (*self.prelude, *self.recur, *self.coda))
        self.adapter = Adapter(d, cfg.adapter, cfg.adapter_init) if cfg.n_shared > 0 else None
        # Tied: the head reads embed.weight (one tensor in the state dict, one parameter for the optimizer).
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.final_gain = nn.Parameter(torch.ones(d)) if cfg.final_norm_gain else None
        self.eps = cfg.norm_eps or None
        cos, sin = self.rotary()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    def rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return rotary_tables(c.seq_len, c.d_model // c.n_head, c.rope_base, c.rope_convention)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.cfg.d_model
        bound = math.sqrt(3.0 / d)  # uniform with std 1/sqrt(d)
        nn.init.normal_(self.embed.weight, std=1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.001)
        if self.final_gain is not None:
            self.final_gain.fill_(1.0)
        for block in [*self.prelude, *self.recur, *self.coda]:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            # Zero output projections: every block starts as the identity, so depth (and r) is free at init.
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        if self.adapter is not None:
            self.adapter.reset_parameters()
        cos, sin = self.rotary()
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    @property
    def head_weight(self) -> torch.Tensor:
        """[vocab, d]: lm_head's matrix, or the embedding matrix when they are tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # -- the pieces, exposed separately so the inference engine and torch.compile can use them one by one --------

    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.cos.size(1):
            raise ValueError(f"positions up to {start + length} exceed the context length {self.cos.size(1)}")
        return self.cos[:, start:start + length], self.sin[:, start:start + length]

    def run_prelude(self, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches=None) -> torch.Tensor:
        x = self.embed(idx)
        x = norm(x, self.eps) if self.cfg.embed_norm else x
        for i, block in enumerate(self.prelude):
            x = block(x, cos, sin, None if caches is None else caches[i])
        return x

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.state_init
        if kind == "e":
            return e
        if kind == "zeros":
            return torch.zeros_like(e)
        return torch.randn_like(e) * self.cfg.state_noise_std

    def iterate(self, e: torch.Tensor, s: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                caches=None) -> torch.Tensor:
        """One application of the recurrent stack: s ← recur_blocks(adapter(e, s)), RMS-normalised with state_norm."""
        x = self.adapter(e, s)
        for i, block in enumerate(self.recur):
            x = block(x, cos, sin, None if caches is None else caches[i])
        return norm(x, self.eps) if self.cfg.state_norm else x

    def loop(self, e: torch.Tensor, s: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, steps: int,
             kv=None, after=None, iterate=None) -> torch.Tensor:
        """The recurrent loop, written here once for every caller (training forward, unroll, the engine's passes,
        the HF modeling file): up to `steps` applications of `iterate` (default self.iterate; the trainer passes its
        compiled stage) from state s; returns the last state.

        `kv(i)` gives iteration i's (0-based) KV caches, one per shared block. `after(i, s)` is the per-iteration
        hook, called with the state after iteration i (1-based): it returns None to go on, a tuple (e, s, cos, sin)
        to go on with those rows (the rows that stopped taken out), or () to stop the loop."""
        iterate = iterate or self.iterate
        for i in range(steps):
            s = iterate(e, s, cos, sin, None if kv is None else kv(i))
            if after is None:
                continue
            rows = after(i + 1, s)
            if rows is None:
                continue
            if not rows:
                break
            e, s, cos, sin = rows
        return s

    def run_coda(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches=None) -> torch.Tensor:
        for i, block in enumerate(self.coda):
            x = block(x, cos, sin, None if caches is None else caches[i])
        return x

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What lm_head reads: the final RMSNorm of x, times the learned gain where the model has one."""
        x = norm(x, self.eps)
        return x if self.final_gain is None else x * self.final_gain.to(x.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits in fp32. The cap runs in the matmul's dtype (bf16 under autocast, as nanochat does)
        and only its result is widened: on a CPU the fp32 temporaries of a [B·T, vocab] cap are each a fresh 32 MiB
        allocation that glibc maps and zeroes page by page, and cost 14% of an eager bf16 training step (cpu-tiny)."""
        return softcapped(F.linear(self.head_input(x), self.head_weight), self.cfg.logit_softcap)

    @torch.no_grad()
    def unroll(self, idx: torch.Tensor, depth: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(states s_0 … s_depth, cos, sin) of the uncached forward run to `depth` iterations, every position
        running every iteration as in training; `self.tail_logits(s, cos, sin)` reads any of them out."""
        if not self.recur:
            raise ValueError("a standard model has no iterations to unroll")
        cos, sin = self.rope(0, idx.size(1))
        e = self.run_prelude(idx, cos, sin)
        states = [self.initial_state(e)]
        self.loop(e, states[0], cos, sin, depth, after=lambda i, s: states.append(s))
        return states, cos, sin

    def tail_logits(self, s: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] read out of a state: coda, norm, head."""
        return self.loss_or_logits(s, cos, sin)

    # -- the whole model ---------------------------------------------------------------------------------------

    def loss_or_logits(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Coda, head and (with targets) the cross-entropy: one stage, so a compiler can fuse the loss in. On a CPU
        the loss never materialises the [B·T, vocab] logits (model/head_loss.py)."""
        x = self.run_coda(x, cos, sin)
        if targets is None:
            return self.head(x)
        loss = head_cross_entropy(self.head_input(x).flatten(0, -2), self.head_weight, targets.reshape(-1),
                                  self.cfg.logit_softcap, reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def compile_stages(self, **compile_kwargs) -> "RecurrentLM":
        """torch.compile the prelude, ONE iteration and the coda+loss separately; the loop over r stays in Python.

        Compiling the whole forward bakes r into the graph: every new r recompiles (1.5–4.5 s each on 2 CPU cores)
        and after 8 values dynamo falls back to eager. With the loop outside, r never reaches the compiler: the
        iteration body compiles twice in all (grad and no-grad mode, for truncated BPTT), whatever r is. We chose
        this over torch._higher_order_ops.while_loop (a single graph with a tensor trip count) because it keeps the
        same code path for eager, compiled, KV-cached and early-exit inference, and backward is plain autograd.
        `recurchat bench train` measures the result.
        """
        self._stages = {name: torch.compile(fn, **compile_kwargs) for name, fn in
                        (("prelude", self.run_prelude), ("iterate", self.iterate_in_dtype),
                         ("tail", self.loss_or_logits))}
        return self

    def iterate_in_dtype(self, e: torch.Tensor, s: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         caches=None) -> torch.Tensor:
        """`iterate`, its state returned in e's dtype: the compiled stage, so every call sees one state dtype (see
        compiled_loop_inputs)."""
        return self.iterate(e, s, cos, sin, caches).to(e.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, num_recur: int | None = None,
                bptt_k: int | None = None, init_state: torch.Tensor | None = None, return_state: bool = False,
                loss_reduction: str = "mean", hints: torch.Tensor | None = None, hint_lag: int = 1):
        """Loss if `targets` is given (ignore_index −1), else logits [B, T, V]; with `return_state`, a pair whose
        second item is the final recurrent state s_r (None for the standard model), usable as a warm start. With
        `hints` ([B, T, H] intermediate targets, −1 ignored; a recursive model and targets only), the pair (loss,
        hint loss): see `hint_readout`."""
        r = self.cfg.mean_recur if num_recur is None else int(num_recur)
        if self.recur and r < 1:
            raise ValueError(f"num_recur must be >= 1, got {r}")
        if hints is not None and (not self.recur or targets is None or return_state):
            raise ValueError("hints need a recursive model and targets (and no return_state)")
        k = r if bptt_k is None else int(bptt_k)
        if k < 1:
            raise ValueError(f"bptt_k must be >= 1, got {k}")
        stages = getattr(self, "_stages", None) or {}
        iterate = stages.get("iterate", self.iterate)
        cos, sin = self.rope(0, idx.size(1))
        x = stages.get("prelude", self.run_prelude)(idx, cos, sin)
        state, tail, hint_losses = None, stages.get("tail", self.loss_or_logits), []
        if self.recur:
            e = x
            s = self.initial_state(e) if init_state is None else init_state
            if stages:
                e, s = self.compiled_loop_inputs(e, s)
            n_nograd = max(r - k, 0)
            if n_nograd:
                # No autograd graph for these iterations: memory stays flat in r, and the grad iterations start
                # from a detached state (gradients still reach e — and so the prelude — through the adapter).
                with torch.no_grad():
                    s = self.loop(e.detach(), s, cos, sin, n_nograd, iterate=iterate)
            after = None if hints is None else self.hint_readout(
                hints, hint_lag, n_nograd, lambda s_i, hint_i: tail(s_i, cos, sin, hint_i), hint_losses)
            x = state = self.loop(e, s, cos, sin, r - n_nograd, after=after, iterate=iterate)
        out = tail(x, cos, sin, targets, loss_reduction)
        if hints is not None:
            return out, (torch.stack(hint_losses).mean() if hint_losses else out.new_zeros(()))
        return (out, state) if return_state else out

    @staticmethod
    def hint_readout(hints: torch.Tensor, lag: int, skipped: int, loss, losses: list):
        """The loop's per-iteration hook for hints (CLRS-style intermediate targets, arXiv 2205.15659): the state
        after iteration i > lag, read out as the answer would be by `loss(state, targets)` (coda, head and
        cross-entropy), is trained on hints[..., i − lag − 1]: step i − lag of each answer's path, its last step from
        there on. `lag` is the iterations the model has before its first step (P/R/C = 0/1/0 pointer chasing:
        iteration 1 tells each statement token its neighbour, so look-up j can come at iteration j + 1). Iterations
        run without gradients (the first `skipped`, truncated BPTT) are not read out; nor is a batch whose hints are
        all ignored. The losses go to `losses`."""
        if not bool((hints >= 0).any()):
            return None

        def after(i: int, s: torch.Tensor) -> None:
            step = skipped + i - lag
            if step >= 1:
                losses.append(loss(s, hints[..., min(step, hints.size(-1)) - 1]))
        return after

    @staticmethod
    def compiled_loop_inputs(e: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e and s₀ as the compiled iteration should see them at every call: in the compute dtype (under autocast
        the prelude hands over fp32 and each iteration returns bf16) and never one tensor (state_init e makes s₀ e
        itself). Otherwise dynamo guards on the dtype and on `e is s` and compiles the iteration again for each
        combination, and past its limit of 8 graphs (reached on an H200) runs the rest eagerly."""
        device = e.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else e.dtype
        e, s = e.to(dtype), s.to(dtype)
        return e, (s.clone() if s is e else s)

    def refresh_fused_weights(self) -> None:
        """Bring every attention layer's fused QKV weight up to date with its parameters (rebuilt only where one
        changed): a compiled inference step reads them as they stand (layers.Attention.project_qkv), so the runner's
        compiled passes call this before each run."""
        for attn in self.attention_layers:
            attn.fused_qkv_weight()

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def num_params(self) -> dict[str, int]:
        def count(mods) -> int:
            return sum(p.numel() for m in mods if m is not None for p in m.parameters())
        parts = {"embed": count([self.embed]), "prelude": count(self.prelude), "recur": count(self.recur),
                 "adapter": count([self.adapter]), "coda": count(self.coda),
                 "lm_head": count([self.lm_head]) + (0 if self.final_gain is None else self.final_gain.numel())}
        parts["total"] = sum(parts.values())
        return parts
