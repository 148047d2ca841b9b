"""KV caches for recursion: preallocated K/V tensors, one pair per (layer, iteration slot).

Strategies (how many iteration slots each recurrent layer keeps):
  full      one slot per iteration up to max_recur: cached decoding equals the uncached forward;
  last      one slot: every iteration overwrites it, so later tokens read a token's final-iteration K/V;
            memory (P+R+C)/(P+r·R+C) of full at depth r;
  ring:K    K slots, iteration i uses slot i mod K (a middle ground: the last K iterations of each token).
Fill-forward: a token that stopped at iteration j (early exit, or a shallower prefill) is read at a deeper
iteration i from its latest computed iteration ≤ i. The engine calls `fill_forward` when a row stops, which copies
iteration j's K/V into the slots of iterations j+1..max_recur−1 for that position (a no-op for `last`).

Each layer's K and V are tensors of their own, [batch, kv_heads, max_len, head_dim], not views of one big tensor: a
compiled decode step (infer/runner.py) writes them in place, which torch.compile does only for inputs that do not
alias one another (views of one base make it copy the whole base at every step).

Exercise: `pytest tests/infer/test_kv_cache.py`.
"""

from __future__ import annotations

import torch

from recurchat.config import ModelConfig
from recurchat.errors import UserError
from recurchat.model.layers import window_mask


def iteration_slots(strategy: str, max_recur: int) -> int:
    name, _, arg = strategy.partition(":")
    if name == "full" and not arg:
        return max_recur
    if name == "last" and not arg:
        return 1
    if name == "ring":
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k >= 1:
            return min(k, max_recur)
    raise UserError(f"unknown KV-cache strategy {strategy!r} (full | last | ring:K with K >= 1)")


def bytes_per_token(cfg: ModelConfig, strategy: str, num_recur: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V bytes one token occupies when decoding at depth `num_recur` (full grows with r; last does not)."""
    slots = iteration_slots(strategy, num_recur) if cfg.n_shared else 0
    layers = cfg.n_prelude + cfg.n_coda + cfg.n_shared * slots
    head_dim = cfg.d_model // cfg.n_head
    return 2 * layers * cfg.n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()


class Rows:
    """Which cache rows a forward pass touches and, when decoding, each row's position; the attention length
    and mask are computed once here and shared by every layer of the pass.

    Three kinds of pass: a prefill (pos None, start 0: a causal block from position 0), a decode step (one new
    token per row at that row's `pos`), and a chunk (pos None, `start` a tensor with one start per row: `chunk` new
    tokens per row at positions start..start+chunk−1, attending to everything before them; speculative
    verification, where each row of a batch has accepted a different number of tokens)."""

    __slots__ = ("index", "pos", "length", "window", "built_mask", "contiguous", "chunk_pos", "at")

    def __init__(self, index: torch.Tensor, pos: torch.Tensor | None, batch_size: int,
                 start: int | torch.Tensor = 0, chunk: int = 0, window: int = 0):
        self.index, self.pos, self.window, self.chunk_pos, self.at = index, pos, window, None, None
        self.built_mask = None
        if isinstance(start, torch.Tensor):
            self.chunk_pos = start[:, None] + torch.arange(chunk, device=index.device)  # [n, chunk]
            self.length = int(self.chunk_pos.max()) + 1
            self.built_mask = window_mask(self.chunk_pos, self.length, window)[:, None]
        # All rows in order: read keys through a slice (a view) instead of a gather (a copy). One row of a one-row
        # cache is that (no tensor ops: a batch-1 step's bookkeeping costs about what a layer's kernels do).
        one = index.numel() == 1
        self.contiguous = (one and batch_size == 1) or (index.numel() == batch_size and bool(
            (index == torch.arange(batch_size, device=index.device)).all()))
        if pos is not None:
            self.length = (int(pos) if one else int(pos.max())) + 1
            # every cache row at one position, no window (a batch-1 step, or prompts of one length): an eager step
            # writes its K/V through a slice and attends without a mask (an index_put and a mask cost ~20 µs a layer)
            if self.contiguous and not window and (one or bool((pos == self.length - 1).all())):
                self.at = self.length - 1

    @property
    def mask(self) -> torch.Tensor | None:
        """The attention mask of a chunk or decode pass ([n, 1, chunk, length] / [n, 1, 1, length]; None for a
        prefill). A decode pass builds its own on first use, so a step that never reads it (an eager step at one
        position) never pays for it, and a compiled step builds it inside its graph."""
        if self.built_mask is not None or self.pos is None:
            return self.built_mask
        mask = window_mask(self.pos, self.length, self.window)[:, None, None, :]
        if not torch.compiler.is_compiling():  # a traced value must not outlive its graph
            self.built_mask = mask
        return mask


class LayerView:
    """What Attention sees: `update(k, v)` stores this step's keys/values and returns everything to attend to."""

    __slots__ = ("layer", "k", "v", "rows")

    def __init__(self, cache: "KVCache", layer: int, rows: Rows):
        # the layer's own K/V tensors: update() never reads the layer number, so a compiled step does not
        # specialise (and recompile) on it
        self.layer, self.k, self.v, self.rows = layer, cache.k[layer], cache.v[layer], rows

    def update(self, k: torch.Tensor, v: torch.Tensor):
        K, V, rows = self.k, self.v, self.rows
        if rows.chunk_pos is not None:  # a chunk per row after its own start
            at = (rows.index[:, None], slice(None), rows.chunk_pos)  # K[at] is [n, chunk, heads, head_dim]
            K[at] = k.transpose(1, 2).to(K.dtype)
            V[at] = v.transpose(1, 2).to(V.dtype)
            keys, values = K[rows.index, :, :rows.length], V[rows.index, :, :rows.length]
            return keys.to(k.dtype), values.to(v.dtype), rows.mask
        if rows.pos is None:  # prefill: causal attention over the new block from position 0
            K[rows.index, :, :k.size(2)] = k.to(K.dtype)
            V[rows.index, :, :v.size(2)] = v.to(V.dtype)
            return k, v, None
        # decode: one new token per row at that row's own position; an eager step whose rows all sit at one
        # position (rows.at; a compiled one never reads it, or dynamo would specialise on it) writes through a slice
        # and attends with no mask
        sliced = not torch.compiler.is_compiling() and rows.at is not None
        if sliced:
            K[:, :, rows.at] = k[:, :, 0]
            V[:, :, rows.at] = v[:, :, 0]
        else:
            K[rows.index, :, rows.pos] = k[:, :, 0].to(K.dtype)
            V[rows.index, :, rows.pos] = v[:, :, 0].to(V.dtype)
        if rows.contiguous:
            keys, values = K[:, :, :rows.length], V[:, :, :rows.length]
        else:
            keys, values = K[rows.index, :, :rows.length], V[rows.index, :, :rows.length]
        return keys.to(k.dtype), values.to(v.dtype), None if sliced else rows.mask


class KVCache:
    def __init__(self, cfg: ModelConfig, strategy: str, batch_size: int, max_len: int, max_recur: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg, self.strategy, self.max_recur = cfg, strategy, max_recur
        self.slots = iteration_slots(strategy, max_recur) if cfg.n_shared else 0
        n_layers = cfg.n_prelude + cfg.n_coda + cfg.n_shared * self.slots
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.d_model // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    # layer numbering: prelude 0..P-1, then coda P..P+C-1, then recurrent layer j / slot s
    def _recur_layer(self, j: int, iteration: int) -> int:
        return self.cfg.n_prelude + self.cfg.n_coda + j * self.slots + iteration % self.slots

    def rows(self, index: torch.Tensor, pos: torch.Tensor | None, start: int | torch.Tensor = 0,
             chunk: int = 0) -> Rows:
        return Rows(index, pos, self.batch_size, start, chunk, self.cfg.attn_window)

    def prelude(self, rows: Rows) -> list[LayerView]:
        return [LayerView(self, i, rows) for i in range(self.cfg.n_prelude)]

    def coda(self, rows: Rows) -> list[LayerView]:
        return [LayerView(self, self.cfg.n_prelude + i, rows) for i in range(self.cfg.n_coda)]

    def recur(self, iteration: int, rows: Rows) -> list[LayerView]:
        return [LayerView(self, self._recur_layer(j, iteration), rows) for j in range(self.cfg.n_shared)]

    def fill_forward(self, rows: torch.Tensor, pos: torch.Tensor | None, done: int, upto: int) -> None:
        """Rows stopped after `done` iterations: make iterations done..upto−1 read iteration done−1's K/V.

        pos None means positions [0, max_len) (after prefill); else one position per row.
        """
        if self.slots <= 1 or done >= upto or done < 1:
            return
        targets = sorted({i % self.slots for i in range(done, upto)} - {(done - 1) % self.slots})
        if not targets:
            return
        at = (rows,) if pos is None else (rows, slice(None), pos)
        for j in range(self.cfg.n_shared):
            src = self._recur_layer(j, done - 1)
            for buf in (self.k, self.v):
                value = buf[src][at]
                for slot in targets:
                    buf[self._recur_layer(j, slot)][at] = value
