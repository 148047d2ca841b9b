"""The engine: cached decoding equals the uncached forward and the naive sampler, batching equals one-at-a-time,
exited rows stay put.

Run: `pytest tests/infer/test_engine.py`.
"""

import dataclasses

import pytest
import torch
from support import random_model

from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.exit import ExitCriterion
from recurchat.infer.kv_cache import KVCache, bytes_per_token
from recurchat.infer.naive import generate_naive
from recurchat.infer.plan import DepthPlan, RowPlans
from recurchat.infer.sampling import SamplingParams


def fixed_plans(r: int, n: int = 1) -> RowPlans:
    return RowPlans.same(DepthPlan(ExitCriterion("fixed", r), 1, r, r), n, torch.device("cpu"))


def cached_logits(engine, seq, prompt_len, r, kv="full", max_steps=None):
    """Prefill seq[:prompt_len], then teacher-force the rest one token at a time; logits at every position."""
    m = engine.model
    max_steps = max_steps or r
    cache = KVCache(m.cfg, kv, 1, m.cfg.seq_len, max_steps)
    idx = torch.tensor([seq[:prompt_len]])
    lens = torch.tensor([prompt_len])
    out = []
    with torch.no_grad():
        logits, _ = engine.runner.prefill(cache, idx, lens, r, max_steps)
        out.append(logits[0])
        for t in range(prompt_len, len(seq)):
            logits, depth, _ = engine.runner.decode(cache, torch.tensor([seq[t]]), torch.tensor([0]), torch.tensor([t]),
                                             None, fixed_plans(r))
            assert int(depth[0]) == (r if m.recur else 0)
            out.append(logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("n_coda", [0, 2])
def test_full_cache_equals_uncached_forward(tiny_cfg, r, n_coda):
    cfg = dataclasses.replace(tiny_cfg, n_coda=n_coda)
    m = random_model(cfg)
    engine = Engine(m, dtype="fp32")
    seq = torch.randint(0, cfg.vocab_size, (20,)).tolist()
    got = cached_logits(engine, seq, 7, r)
    with torch.no_grad():
        ref = m(torch.tensor([seq]), num_recur=r)[0, 6:]
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_last_equals_full_at_r1_and_differs_deeper(tiny_cfg):
    m = random_model(tiny_cfg)
    engine = Engine(m, dtype="fp32")
    seq = torch.randint(0, tiny_cfg.vocab_size, (16,)).tolist()
    assert torch.allclose(cached_logits(engine, seq, 5, 1, "last"), cached_logits(engine, seq, 5, 1, "full"),
                          atol=1e-5)
    assert not torch.allclose(cached_logits(engine, seq, 5, 3, "last"), cached_logits(engine, seq, 5, 3, "full"),
                              atol=1e-4)
    # ring with K >= r is the full cache
    assert torch.allclose(cached_logits(engine, seq, 5, 3, "ring:3"), cached_logits(engine, seq, 5, 3, "full"),
                          atol=1e-5)


def ring_reference_logits(engine, seq, prompt_len, r, k):
    """What ring:K promises, built on the full cache: once a token has run its r iterations, a later token at
    iteration i reads that token's iteration j, the last one ≡ i (mod K) — the one left in slot i mod K."""
    m = engine.model
    full = KVCache(m.cfg, "full", 1, m.cfg.seq_len, r)

    def keep_only_the_ring(positions):
        for layer in range(m.cfg.n_shared):
            for i in range(r):
                j = i + k * ((r - 1 - i) // k)
                for buf in (full.k, full.v):
                    buf[full._recur_layer(layer, i)][:, :, positions] = buf[full._recur_layer(layer, j)][:, :,
                                                                                                      positions]
    out = []
    with torch.no_grad():
        logits, _ = engine.runner.prefill(full, torch.tensor([seq[:prompt_len]]), torch.tensor([prompt_len]), r, r)
        keep_only_the_ring(slice(0, prompt_len))
        out.append(logits[0])
        for t in range(prompt_len, len(seq)):
            logits, _, _ = engine.runner.decode(full, torch.tensor([seq[t]]), torch.tensor([0]), torch.tensor([t]), None,
                                          fixed_plans(r))
            keep_only_the_ring(slice(t, t + 1))
            out.append(logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("r,k", [(4, 1), (4, 2), (5, 2), (6, 4)])
def test_ring_with_fewer_slots_than_iterations_reads_the_last_iteration_of_each_residue(tiny_cfg, r, k):
    m = random_model(tiny_cfg, seed=4)
    engine = Engine(m, dtype="fp32")
    seq = torch.randint(0, tiny_cfg.vocab_size, (14,), generator=torch.Generator().manual_seed(1)).tolist()
    ring = cached_logits(engine, seq, 5, r, f"ring:{k}")
    assert torch.allclose(ring, ring_reference_logits(engine, seq, 5, r, k), atol=1e-5)
    assert not torch.allclose(ring, cached_logits(engine, seq, 5, r, "full"), atol=1e-4)  # K < r is not full
    if k == 1:
        assert torch.allclose(ring, cached_logits(engine, seq, 5, r, "last"), atol=1e-6)


def test_standard_model_cache(tiny_cfg):
    cfg = tiny_cfg.standard_twin()
    m = random_model(cfg)
    seq = torch.randint(0, cfg.vocab_size, (12,)).tolist()
    got = cached_logits(Engine(m, dtype="fp32"), seq, 4, 1)
    with torch.no_grad():
        ref = m(torch.tensor([seq]))[0, 3:]
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("window", [2, 3])
def test_windowed_attention_cache_equals_uncached_forward_and_sees_only_the_window(tiny_cfg, window):
    cfg = dataclasses.replace(tiny_cfg, attn_window=window, n_coda=1)
    m = random_model(cfg, seed=2)
    engine = Engine(m, dtype="fp32")
    seq = torch.randint(0, cfg.vocab_size, (20,)).tolist()
    got = cached_logits(engine, seq, 7, 3)
    with torch.no_grad():
        ref = m(torch.tensor([seq]), num_recur=3)[0, 6:]
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
        # a token beyond every layer's reach (window − 1 positions per layer, P + r·R + C layers) changes nothing
        layers = cfg.n_prelude + 3 * cfg.n_shared + cfg.n_coda
        far = 19 - layers * (window - 1) - 1
        changed = list(seq)
        changed[far] = (seq[far] + 1) % cfg.vocab_size
        other = m(torch.tensor([changed]), num_recur=3)[0, 19]
        assert torch.allclose(other, m(torch.tensor([seq]), num_recur=3)[0, 19], atol=1e-5)
        changed[17] = (seq[17] + 1) % cfg.vocab_size  # within reach: it does change position 19
        assert not torch.allclose(m(torch.tensor([changed]), num_recur=3)[0, 19], other, atol=1e-5)
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = [seq[:9], seq[:4]]
    batched = engine.generate(prompts, sp, RecurParams(exit="latent:0.05", max_recur=6))
    assert [b.tokens for b in batched] == [engine.generate([p], sp, RecurParams(exit="latent:0.05", max_recur=6))[0].tokens
                                           for p in prompts]


@pytest.mark.parametrize("recur,lengths", [
    (RecurParams(num_recur=3), (3, 9, 5, 1)),
    (RecurParams(exit="latent:0.05", max_recur=6), (3, 9, 5, 1)),
    (RecurParams(exit="kl:0.01", max_recur=6, kv="last", warm_start=True), (3, 9, 5, 1)),
    (RecurParams(exit="kl:0.003", max_recur=8), (3, 9, 5, 1, 12, 2, 7, 4, 6, 10, 8, 1)),  # many rows, many depths
])
def test_batched_greedy_equals_one_at_a_time(tiny_cfg, recur, lengths):
    m = random_model(tiny_cfg, seed=1)
    engine = Engine(m, dtype="fp32")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tiny_cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    batched = engine.generate(prompts, sp, recur)
    for p, b in zip(prompts, batched):
        single = engine.generate([p], sp, recur)[0]
        assert single.tokens == b.tokens and single.depths == b.depths
    assert all(len(b.tokens) == 8 for b in batched)
    if len(lengths) > 4:  # rows left the iteration loop at different depths within the same steps
        depths = [set(step) for step in zip(*(b.depths[1:] for b in batched))]
        assert any(len(d) >= 3 for d in depths), depths


def test_exited_row_no_longer_changes_and_compute_is_saved(tiny_cfg):
    """Row 0 exits at step 1 (crafted: min=max for it is impossible, so use a criterion threshold that is always
    met) while the batch keeps iterating for nobody: compare with fixed depth the iteration counts."""
    m = random_model(tiny_cfg, seed=2)
    engine = Engine(m, dtype="fp32")
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    engine.runner.iterations = 0
    fixed = engine.generate(prompts, sp, RecurParams(num_recur=6))
    fixed_iters = engine.runner.iterations
    engine.runner.iterations = 0
    early = engine.generate(prompts, sp, RecurParams(exit="latent:1e9", max_recur=6, min_recur=2))
    early_iters = engine.runner.iterations
    assert all(d == 2 for g in early for d in g.depths[1:])
    assert early_iters < fixed_iters
    assert all(d == 6 for g in fixed for d in g.depths)


class ScriptedTracker:
    """Stands in for ExitTracker: row b of a decode step exits after `exit_at[b]` iterations (rows are dropped in
    step with the engine's `keep`, so the schedule follows each row, whatever its place in the active set)."""

    exit_at: list[int] = []

    def __init__(self, criterion, n_rows, device, gate=None, initial_state=None):
        assert len(self.exit_at) == n_rows
        self.left = torch.tensor(self.exit_at)

    def keep(self, mask):
        self.left = self.left[mask]

    def update(self, step, state, logits):
        return self.left <= step


def test_exited_rows_state_frozen(tiny_cfg, monkeypatch):
    """In one decode step, a row that exits early keeps its logits, state and K/V while other rows iterate on."""
    from recurchat.infer.exit import ExitCriterion
    monkeypatch.setattr("recurchat.infer.plan.ExitTracker", ScriptedTracker)
    m = random_model(tiny_cfg, seed=3)
    engine = Engine(m, dtype="fp32")
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    crit = ExitCriterion("latent", 0.0)  # checked every iteration; the scripted tracker decides who stops

    def decode(rows, exit_at):
        """Prefill both rows at depth 2, then decode `rows` (one new token each) with a per-row exit schedule."""
        ScriptedTracker.exit_at = exit_at
        cache = KVCache(tiny_cfg, "full", 2, tiny_cfg.seq_len, 6)
        with torch.no_grad():
            engine.runner.prefill(cache, idx, torch.tensor([3, 3]), 2, 6)
            rows = torch.tensor(rows)
            logits, depth, state = engine.runner.decode(cache, torch.tensor([7, 8])[rows], rows, torch.tensor([3, 3])[rows],
                                                  None, RowPlans.same(DepthPlan(crit, 1, 6, 6), len(rows),
                                                                      torch.device("cpu")))
        return logits, depth, state, cache

    logits, depth, state, cache = decode([0, 1], [2, 99])  # row 0 exits at 2, row 1 runs on to 6
    assert depth.tolist() == [2, 6]
    alone0 = decode([0], [2])  # row 0 by itself, exiting at 2: nothing else ran after it stopped
    alone1 = decode([1], [99])  # row 1 by itself at depth 6
    deep0 = decode([0], [99])  # row 0 had it not exited
    assert torch.allclose(logits[0], alone0[0][0], atol=1e-5) and torch.allclose(state[0], alone0[2][0], atol=1e-5)
    assert torch.allclose(logits[1], alone1[0][0], atol=1e-5) and torch.allclose(state[1], alone1[2][0], atol=1e-5)
    assert not torch.allclose(logits[0], deep0[0][0], atol=1e-3)  # exiting at 2 is not the same as running to 6
    # the exited row's logits and state are exactly those of an uncached forward at depth 2
    with torch.no_grad():
        ref, ref_state = m(torch.tensor([[1, 2, 3, 7]]), num_recur=2, return_state=True)
    assert torch.allclose(logits[0], ref[0, -1], atol=1e-4) and torch.allclose(state[0, 0], ref_state[0, -1], atol=1e-4)
    # its K/V rows are untouched by the iterations row 1 went on to run; iterations 2..5 at its position are
    # filled forward from iteration 1 (the last one it computed)
    k, v = torch.stack(cache.k), torch.stack(cache.v)
    assert torch.allclose(k[:, 0], torch.stack(alone0[3].k)[:, 0], atol=1e-6)
    assert torch.allclose(v[:, 0], torch.stack(alone0[3].v)[:, 0], atol=1e-6)
    assert torch.allclose(k[:, 1], torch.stack(alone1[3].k)[:, 1], atol=1e-6)
    for j in range(tiny_cfg.n_shared):
        src = cache._recur_layer(j, 1)
        for i in range(2, 6):
            assert torch.equal(k[cache._recur_layer(j, i), 0, :, 3], k[src, 0, :, 3])


@pytest.mark.parametrize("r", [1, 3])
def test_cached_generation_equals_the_naive_recompute_sampler(tiny_cfg, r):
    """The naive sampler (infer/naive.py) recomputes the whole sequence per token: the reference for the cache."""
    m = random_model(tiny_cfg, seed=5)
    engine = Engine(m, dtype="fp32")
    prompt = [5, 9, 2, 7]
    greedy = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0), RecurParams(num_recur=r))[0]
    assert greedy.tokens == generate_naive(m, prompt, 12, num_recur=r, temperature=0.0)
    sampled = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=3),
                              RecurParams(num_recur=r))[0]
    assert sampled.tokens == generate_naive(m, prompt, 12, num_recur=r, temperature=1.0, top_k=20, seed=3)
    stop = greedy.tokens[4]
    assert generate_naive(m, prompt, 12, num_recur=r, temperature=0.0, stop_ids=(stop,)) == \
        greedy.tokens[:greedy.tokens.index(stop)]


def test_sampling_seed_and_stop(tiny_cfg):
    m = random_model(tiny_cfg)
    engine = Engine(m, dtype="fp32")
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    a = engine.generate([[1, 2]], sp)[0]
    b = engine.generate([[1, 2]], sp)[0]
    assert a.tokens == b.tokens
    stop = a.tokens[3]
    c = engine.generate([[1, 2]], dataclasses.replace(sp, stop_ids=(stop,)))[0]
    assert c.finish_reason == "stop" and stop not in c.tokens and len(c.tokens) == a.tokens.index(stop)


def test_stream_yields_per_step(tiny_cfg):
    m = random_model(tiny_cfg)
    steps = list(Engine(m, dtype="fp32").stream([[1, 2, 3], [4]], SamplingParams(max_tokens=4, temperature=0)))
    assert len(steps) == 4 and all(len(s) == 2 for s in steps)
    assert all(ev.finish_reason == "length" for ev in steps[-1])


def test_bytes_per_token_matches_allocation(tiny_cfg):
    for kv, slots in (("full", 6), ("last", 1), ("ring:2", 2)):
        cache = KVCache(tiny_cfg, kv, 1, tiny_cfg.seq_len, 6)
        assert cache.slots == slots
        assert len(cache.k) == tiny_cfg.n_prelude + tiny_cfg.n_coda + tiny_cfg.n_shared * slots
        assert cache.nbytes() == bytes_per_token(tiny_cfg, kv, 6, torch.float32) * tiny_cfg.seq_len
    cfg = tiny_cfg
    full, last = bytes_per_token(cfg, "full", 4), bytes_per_token(cfg, "last", 4)
    P, R, C = cfg.n_prelude, cfg.n_shared, cfg.n_coda
    assert last / full == pytest.approx((P + R + C) / (P + 4 * R + C))


def test_per_row_sampling_params_and_cancel(tiny_cfg):
    m = random_model(tiny_cfg)
    engine = Engine(m, dtype="fp32")
    prompts = [[1, 2], [3, 4, 5], [6]]
    params = [SamplingParams(max_tokens=3, temperature=0), SamplingParams(max_tokens=6, temperature=0),
              SamplingParams(max_tokens=6, temperature=1.0, seed=7)]
    gens = engine.generate(prompts, params)
    assert [len(g.tokens) for g in gens] == [3, 6, 6]
    # greedy rows match their single-row runs even when batched with a sampled row
    assert gens[1].tokens == engine.generate([prompts[1]], params[1])[0].tokens
    # cancelling row 1 after its second token stops it; the others go on
    seen = {0: 0, 1: 0, 2: 0}

    def cancelled(row):
        return row == 1 and seen[1] >= 2

    for events in engine.stream(prompts, params, cancelled=cancelled):
        for ev in events:
            seen[ev.row] += 1
            if ev.row == 1 and ev.finish_reason:
                assert ev.finish_reason == "cancelled"
    assert seen == {0: 3, 1: 3, 2: 6}


def test_kv_cache_is_sized_to_prompt_plus_max_tokens(tiny_cfg, monkeypatch):
    """A short request allocates the positions it can reach, not the whole context, and decodes the same."""
    import recurchat.infer.batcher as engine_module  # where the engine allocates its caches

    sizes = []

    class Recording(engine_module.KVCache):
        def __init__(self, cfg, strategy, batch_size, max_len, *args, **kwargs):
            sizes.append(max_len)
            super().__init__(cfg, strategy, batch_size, max_len, *args, **kwargs)

    m = random_model(tiny_cfg)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    sampling = SamplingParams(max_tokens=6, temperature=0)
    monkeypatch.setattr(engine_module, "KVCache", Recording)
    small = [g.tokens for g in Engine(m, dtype="fp32").generate(prompts, sampling, RecurParams(num_recur=3))]
    assert sizes == [5 + 6] and sizes[0] < tiny_cfg.seq_len
    # the same tokens as recomputing the whole sequence for every token (no cache at all)
    assert small == [generate_naive(m, p, 6, num_recur=3, temperature=0) for p in prompts]
    long = SamplingParams(max_tokens=10 * tiny_cfg.seq_len, temperature=0)
    Engine(m, dtype="fp32").generate([[1, 2]], long, RecurParams(num_recur=2))
    assert sizes[-1] == tiny_cfg.seq_len  # never more than the context


def test_ring_is_refused_with_an_exit_criterion(tiny_cfg):
    """A ring slot serves iterations i ≡ s (mod K): with tokens stopping at different depths it cannot give a
    later token both iteration i (< the stop) and the last computed one (≥ the stop), so ring is fixed-depth only."""
    from recurchat.infer.engine import RecurError

    for bad in (RecurParams(exit="kl:1e-3", kv="ring:2"), RecurParams(exit="fixed:4", kv="ring:3"),
                RecurParams(num_recur=4, prefill_recur=2, kv="ring:2")):
        with pytest.raises(RecurError, match="ring:K keeps the last K iterations") as err:
            bad.validate(tiny_cfg)
        assert err.value.param == "kv"
    assert RecurParams(num_recur=4, kv="ring:2").validate(tiny_cfg).kv == "ring:2"
    assert RecurParams(exit="kl:1e-3", kv="last").validate(tiny_cfg).kv == "last"
