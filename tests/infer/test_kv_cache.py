"""KV caches for recursion: iteration slots per strategy (full / last / ring:K), bytes per token, the layer each
iteration writes to, and fill-forward (a row that stopped early is read at deeper iterations from its last one).

Run: `pytest tests/infer/test_kv_cache.py`.
"""

import dataclasses

import pytest
import torch

from recurchat.errors import UserError
from recurchat.infer.kv_cache import KVCache, LayerView, bytes_per_token, iteration_slots
from recurchat.model.layers import Attention, rotary_tables


# ---- iteration slots ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, max_recur, slots", [
    ("full", 1, 1), ("full", 6, 6), ("full", 16, 16),
    ("last", 1, 1), ("last", 6, 1),
    ("ring:1", 6, 1), ("ring:2", 6, 2), ("ring:6", 6, 6), ("ring:9", 6, 6),  # K > max_recur is just full
])
def test_iteration_slots(strategy, max_recur, slots):
    assert iteration_slots(strategy, max_recur) == slots


@pytest.mark.parametrize("strategy", ["", "lru", "FULL", "full:2", "last:1", "ring", "ring:", "ring:0", "ring:-1",
                                      "ring:x", "ring:1.5", ":2"])
def test_iteration_slots_rejects_bad_strategies(strategy):
    with pytest.raises(UserError, match=r"unknown KV-cache strategy .*\(full \| last \| ring:K with K >= 1\)"):
        iteration_slots(strategy, 6)


# ---- bytes per token --------------------------------------------------------------------------------------------
def test_bytes_per_token_last_is_flat_and_full_grows_with_r(tiny_cfg):
    P, R, C = tiny_cfg.n_prelude, tiny_cfg.n_shared, tiny_cfg.n_coda
    head_dim = tiny_cfg.d_model // tiny_cfg.n_head
    per_layer = 2 * tiny_cfg.n_kv_head * head_dim * 2  # K and V, bf16
    last = bytes_per_token(tiny_cfg, "last", 1)
    assert last == (P + R + C) * per_layer
    assert all(bytes_per_token(tiny_cfg, "last", r) == last for r in range(1, 17))
    full = [bytes_per_token(tiny_cfg, "full", r) for r in range(1, 17)]
    assert full[0] == last  # one iteration: one slot either way
    assert all(b - a == R * per_layer for a, b in zip(full, full[1:]))  # R more layers' K/V per extra iteration
    for r in (1, 2, 4, 8, 16):
        assert last / bytes_per_token(tiny_cfg, "full", r) == pytest.approx((P + R + C) / (P + r * R + C))
    # ring:K grows like full up to K iterations, then stays flat
    assert [bytes_per_token(tiny_cfg, "ring:3", r) for r in (1, 2, 3, 4, 8)] == [*full[:3], full[2], full[2]]
    assert bytes_per_token(tiny_cfg, "full", 4, torch.float32) == 2 * bytes_per_token(tiny_cfg, "full", 4)


def test_bytes_per_token_of_the_standard_model_ignores_r(tiny_cfg):
    cfg = tiny_cfg.standard_twin()
    one = bytes_per_token(cfg, "full", 1)
    assert one == 2 * (cfg.n_prelude + cfg.n_coda) * cfg.n_kv_head * (cfg.d_model // cfg.n_head) * 2
    assert bytes_per_token(cfg, "full", 8) == bytes_per_token(cfg, "last", 8) == one


@pytest.mark.parametrize("strategy", ["full", "last", "ring:2"])
def test_allocation_matches_bytes_per_token(tiny_cfg, strategy):
    cache = KVCache(tiny_cfg, strategy, 3, 10, 5)
    slots = iteration_slots(strategy, 5)
    assert cache.slots == slots
    assert len(cache.k) == len(cache.v) == tiny_cfg.n_prelude + tiny_cfg.n_coda + tiny_cfg.n_shared * slots
    assert {t.shape for t in (*cache.k, *cache.v)} == {(3, tiny_cfg.n_kv_head, 10, tiny_cfg.d_model // tiny_cfg.n_head)}
    assert len({t.data_ptr() for t in (*cache.k, *cache.v)}) == 2 * len(cache.k)  # no two layers share storage
    assert cache.nbytes() == 3 * 10 * bytes_per_token(tiny_cfg, strategy, 5, torch.float32)


# ---- which layer each iteration uses ------------------------------------------------------------------------------
def layers(cache, iteration):
    view = cache.rows(torch.arange(1), None)
    return [lv.layer for lv in cache.recur(iteration, view)]


def test_iteration_to_layer_mapping(tiny_cfg):
    P, R, C = tiny_cfg.n_prelude, tiny_cfg.n_shared, tiny_cfg.n_coda
    full = KVCache(tiny_cfg, "full", 1, 4, 4)
    view = full.rows(torch.arange(1), None)
    assert [lv.layer for lv in full.prelude(view)] == list(range(P))
    assert [lv.layer for lv in full.coda(view)] == list(range(P, P + C))
    seen = [layer for i in range(4) for layer in layers(full, i)]
    assert sorted(seen) == list(range(P + C, P + C + 4 * R))  # every (block, iteration) has its own layer
    last = KVCache(tiny_cfg, "last", 1, 4, 4)
    assert all(layers(last, i) == layers(last, 0) for i in range(4))  # one slot, overwritten each iteration
    ring = KVCache(tiny_cfg, "ring:2", 1, 4, 6)
    assert layers(ring, 0) != layers(ring, 1)
    assert all(layers(ring, i) == layers(ring, i % 2) for i in range(6))  # iteration i uses slot i mod K


# ---- fill-forward -----------------------------------------------------------------------------------------------
def numbered(cfg, strategy, max_recur, batch=2, max_len=4):
    """A cache whose every K/V entry is distinct, so any copy shows."""
    cache = KVCache(cfg, strategy, batch, max_len, max_recur)
    n = cache.k[0].numel()
    for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
        k.copy_(torch.arange(layer * n, (layer + 1) * n, dtype=torch.float32).view_as(k))
        v.copy_(-torch.arange(layer * n, (layer + 1) * n, dtype=torch.float32).view_as(v))
    return cache


def stacked(cache):
    """(K, V) of every layer as [layers, batch, kv_heads, max_len, head_dim] copies."""
    return torch.stack(cache.k), torch.stack(cache.v)


def test_fill_forward_at_one_position(tiny_cfg):
    """Row 1 stopped after 2 iterations at position 2: iterations 2..4 there now read iteration 1's K/V, and
    nothing else (other rows, other positions, prelude/coda, iterations 0 and 1) changes."""
    cache = numbered(tiny_cfg, "full", 5)
    k0, v0 = stacked(cache)
    cache.fill_forward(torch.tensor([1]), torch.tensor([2]), done=2, upto=5)
    expect_k, expect_v = k0.clone(), v0.clone()
    for j in range(tiny_cfg.n_shared):
        src = cache._recur_layer(j, 1)
        for i in (2, 3, 4):
            dst = cache._recur_layer(j, i)
            expect_k[dst, 1, :, 2] = k0[src, 1, :, 2]
            expect_v[dst, 1, :, 2] = v0[src, 1, :, 2]
    k, v = stacked(cache)
    assert torch.equal(k, expect_k) and torch.equal(v, expect_v)
    assert not torch.equal(k, k0)  # something was copied


def test_fill_forward_after_prefill_covers_every_position_of_the_rows(tiny_cfg):
    cache = numbered(tiny_cfg, "full", 4, batch=3)
    k0 = stacked(cache)[0]
    cache.fill_forward(torch.tensor([0, 2]), None, done=1, upto=4)
    k = stacked(cache)[0]
    for j in range(tiny_cfg.n_shared):
        src = cache._recur_layer(j, 0)
        for i in range(1, 4):
            dst = cache._recur_layer(j, i)
            assert torch.equal(k[dst, [0, 2]], k0[src, [0, 2]])
            assert torch.equal(k[dst, 1], k0[dst, 1])  # row 1 did not stop: untouched
        assert torch.equal(k[src], k0[src])


def test_fill_forward_with_a_ring_fills_the_slots_deeper_iterations_read(tiny_cfg):
    """ring:3, stopped after 2 iterations (slots 0, 1 written): iterations 2..5 use slots 2, 0, 1, 2, so slots 2
    and 0 must now hold iteration 1's K/V (the latest one computed); slot 1 already does."""
    cache = numbered(tiny_cfg, "ring:3", 6)
    k0 = stacked(cache)[0]
    cache.fill_forward(torch.tensor([0]), torch.tensor([1]), done=2, upto=6)
    k = stacked(cache)[0]
    base = tiny_cfg.n_prelude + tiny_cfg.n_coda
    for j in range(tiny_cfg.n_shared):
        slot = [base + j * 3 + s for s in range(3)]
        for i in range(1, 6):  # every iteration >= 1 now reads iteration 1's K/V at that position
            assert torch.equal(k[cache._recur_layer(j, i), 0, :, 1], k0[slot[1], 0, :, 1])
        assert torch.equal(k[slot[0], 0, :, 0], k0[slot[0], 0, :, 0])  # other positions keep their own


@pytest.mark.parametrize("strategy, done, upto", [
    ("last", 2, 5),  # one slot: it already holds the last iteration
    ("full", 5, 5),  # ran to the end: nothing deeper to fill
    ("full", 0, 5),  # ran no iteration: nothing to copy from
    ("ring:1", 2, 5),  # a ring of one slot is `last`
])
def test_fill_forward_no_ops(tiny_cfg, strategy, done, upto):
    cache = numbered(tiny_cfg, strategy, 5)
    k0 = stacked(cache)[0]
    cache.fill_forward(torch.tensor([0, 1]), torch.tensor([0, 3]), done=done, upto=upto)
    assert torch.equal(stacked(cache)[0], k0)


def test_standard_model_cache_has_no_recurrent_layers(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, n_shared=0)
    cache = KVCache(cfg, "full", 1, 4, 8)
    assert cache.slots == 0 and len(cache.k) == cfg.n_prelude + cfg.n_coda
    cache.fill_forward(torch.tensor([0]), None, done=1, upto=8)  # nothing to fill, and no error


@pytest.mark.parametrize("pos, sliced", [([4, 4, 4], True), ([4, 2, 4], False)])
def test_decode_step_with_every_row_at_one_position_writes_a_slice_and_returns_no_mask(tiny_cfg, pos, sliced):
    """All cache rows at one position (batch 1, or prompts of one length): update() writes through a slice and
    returns no mask; rows at their own positions keep the masked path. Both store this step's K/V at each row's
    position and return the keys up to the furthest one."""
    torch.manual_seed(0)
    cache = KVCache(tiny_cfg, "last", 3, 8, 1)
    rows = cache.rows(torch.arange(3), torch.tensor(pos))
    assert (rows.at == 4) is sliced
    kv, d = tiny_cfg.n_kv_head, tiny_cfg.d_model // tiny_cfg.n_head
    k, v = torch.randn(3, kv, 1, d), torch.randn(3, kv, 1, d)
    keys, values, mask = cache.prelude(rows)[0].update(k, v)
    assert (mask is None) is sliced and keys.shape == values.shape == (3, kv, 5, d)
    for i, p in enumerate(pos):
        assert torch.equal(cache.k[0][i, :, p], k[i, :, 0]) and torch.equal(cache.v[0][i, :, p], v[i, :, 0])


def test_attention_of_an_unmasked_decode_step_equals_the_masked_one(tiny_cfg):
    """A decode step whose rows share a position attends without a mask (and must not be taken for a causal block):
    the layer's output equals the same step through the per-row masked path."""
    torch.manual_seed(0)
    attn = Attention(tiny_cfg.d_model, tiny_cfg.n_head, tiny_cfg.n_kv_head).eval()
    caches = [KVCache(tiny_cfg, "last", 2, 8, 1) for _ in range(2)]
    for t in (caches[0].k[0], caches[0].v[0]):
        t.normal_()
    caches[1].k[0].copy_(caches[0].k[0]), caches[1].v[0].copy_(caches[0].v[0])
    cos, sin = rotary_tables(8, tiny_cfg.d_model // tiny_cfg.n_head)
    x = torch.randn(2, 1, tiny_cfg.d_model)
    fast, slow = (c.rows(torch.arange(2), torch.tensor([5, 5])) for c in caches)
    slow.at = None  # the per-row path: index writes and the mask
    with torch.no_grad():
        y = [attn(x, cos[:, 5:6], sin[:, 5:6], LayerView(c, 0, rows)) for c, rows in zip(caches, (fast, slow))]
    torch.testing.assert_close(y[0], y[1])
    assert torch.equal(caches[0].k[0], caches[1].k[0])
