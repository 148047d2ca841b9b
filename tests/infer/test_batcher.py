"""Continuous batching: rows with different depth plans in one batch decode as they would alone, a sequence added
mid-stream gets its first token at the next step, the KV pool is reused, chunked prefill changes nothing.
Run: `pytest tests/infer/test_batcher.py`.
"""

from __future__ import annotations

import torch
from support import random_model

from recurchat.infer import batcher as batcher_module
from recurchat.infer.batcher import ContinuousBatch, Sequence, new_generator
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.plan import DepthPlan
from recurchat.infer.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
SETTINGS = [RecurParams(num_recur=1), RecurParams(num_recur=3), RecurParams(exit="kl:0.01", max_recur=6),
            RecurParams(exit="latent:0.05", max_recur=5, min_recur=2), RecurParams(num_recur=2, warm_start=True),
            RecurParams(exit="entropy:0.05", max_recur=6, warm_start=True)]
PROMPTS = [[5, 9, 2, 7], [11, 3], [1, 2, 3, 4, 5, 6], [8], [40, 41, 42], [17, 18, 19, 20, 21]]


def sequence(i: int, engine: Engine, prompt, recur: RecurParams, params: SamplingParams = GREEDY) -> Sequence:
    return Sequence(i, prompt, params, DepthPlan.of(recur, engine.cfg), new_generator(params.seed, engine.device),
                    recur.warm_start)


def run(batch: ContinuousBatch, out: dict, steps: int | None = None) -> int:
    """Step until idle (or `steps` times), collecting tokens and depths per sequence id; returns steps taken."""
    n = 0
    while batch.busy and (steps is None or n < steps):
        for ev in batch.step():
            if ev.finish_reason != "stop":
                out.setdefault(ev.row, []).append((ev.token, ev.depth))
        n += 1
    return n


def alone(engine: Engine, prompt, recur: RecurParams, params: SamplingParams = GREEDY) -> list[tuple[int, int]]:
    g = engine.generate([prompt], params, recur)[0]
    return list(zip(g.tokens, g.depths))


def test_rows_with_different_depths_and_exit_criteria_in_one_batch_decode_as_alone(tiny_cfg):
    engine = Engine(random_model(tiny_cfg, seed=8), dtype="fp32")
    batch = ContinuousBatch(engine.runner, capacity=len(PROMPTS), max_len=tiny_cfg.seq_len, kv="full", depth=8)
    for i, (prompt, recur) in enumerate(zip(PROMPTS, SETTINGS)):
        batch.add(sequence(i, engine, prompt, recur))
    out: dict = {}
    run(batch, out)
    for i, (prompt, recur) in enumerate(zip(PROMPTS, SETTINGS)):
        assert out[i] == alone(engine, prompt, recur), SETTINGS[i]
    depths = {d for i in (2, 3, 5) for _, d in out[i][1:]}
    assert len(depths) >= 2  # the exit rows did stop at different depths within shared steps


def test_a_sequence_added_mid_stream_gets_its_first_token_at_the_next_step(tiny_cfg):
    engine = Engine(random_model(tiny_cfg, seed=9), dtype="fp32")
    batch = ContinuousBatch(engine.runner, capacity=4, max_len=tiny_cfg.seq_len, kv="full", depth=8)
    long = SamplingParams(max_tokens=12, temperature=0.0)
    for i in range(3):
        batch.add(sequence(i, engine, PROMPTS[i], SETTINGS[i], long))
    out: dict = {}
    assert run(batch, out, steps=4) == 4 and all(len(out[i]) == 4 for i in range(3))
    batch.add(sequence(3, engine, PROMPTS[3], SETTINGS[2], long))
    first = batch.step()
    assert [ev.row for ev in first] == [0, 1, 2, 3]  # one step: its prefill, then its first token with the rest
    for ev in first:
        out.setdefault(ev.row, []).append((ev.token, ev.depth))
    run(batch, out)
    for i in range(3):
        assert out[i] == alone(engine, PROMPTS[i], SETTINGS[i], long)
    assert out[3] == alone(engine, PROMPTS[3], SETTINGS[2], long)


def test_the_pool_is_allocated_once_and_rows_are_reused(tiny_cfg, monkeypatch):
    allocated = []

    class Recording(batcher_module.KVCache):
        def __init__(self, *args, **kwargs):
            allocated.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "KVCache", Recording)
    engine = Engine(random_model(tiny_cfg, seed=10), dtype="fp32")
    batch = ContinuousBatch(engine.runner, capacity=2, max_len=tiny_cfg.seq_len, kv="full", depth=8)
    queue = [sequence(i, engine, PROMPTS[i], SETTINGS[i]) for i in range(len(PROMPTS))]
    out: dict = {}
    rows_used = []
    while queue or batch.busy:
        while queue and batch.fits(queue[0]):
            seq = queue.pop(0)
            batch.add(seq)
            rows_used.append(seq.row)
        run(batch, out, steps=1)
    assert len(allocated) == 1 and set(rows_used) == {0, 1} and len(rows_used) == len(PROMPTS)
    for i in range(len(PROMPTS)):
        assert out[i] == alone(engine, PROMPTS[i], SETTINGS[i])


def test_chunked_prefill_equals_one_pass_and_takes_a_step_per_chunk(tiny_cfg):
    engine = Engine(random_model(tiny_cfg, seed=11), dtype="fp32")
    prompt = list(range(30, 41))  # 11 tokens: chunks of 4, 4, 3
    batch = ContinuousBatch(engine.runner, capacity=2, max_len=tiny_cfg.seq_len, kv="full", depth=8, prefill_chunk=4)
    batch.add(sequence(0, engine, prompt, SETTINGS[2]))
    assert batch.step() == [] and batch.step() == []
    out: dict = {}
    run(batch, out)
    assert out[0] == alone(engine, prompt, SETTINGS[2])


def test_a_seeded_sampled_row_draws_the_same_tokens_alone_or_batched(tiny_cfg):
    engine = Engine(random_model(tiny_cfg, seed=12), dtype="fp32")
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=7)
    batch = ContinuousBatch(engine.runner, capacity=3, max_len=tiny_cfg.seq_len, kv="full", depth=8)
    batch.add(sequence(0, engine, PROMPTS[0], SETTINGS[1], sampled))
    batch.add(sequence(1, engine, PROMPTS[1], SETTINGS[2], SamplingParams(max_tokens=10, temperature=1.0, seed=1)))
    out: dict = {}
    run(batch, out)
    assert out[0] == alone(engine, PROMPTS[0], SETTINGS[1], sampled)
    torch.manual_seed(0)  # the process RNG plays no part
    assert alone(engine, PROMPTS[0], SETTINGS[1], sampled) == out[0]


def test_row_plans_are_kept_while_the_rows_plans_stay_and_rebuilt_when_they_change(tiny_cfg):
    engine = Engine(random_model(tiny_cfg, seed=12), dtype="fp32")
    batch = ContinuousBatch(engine.runner, capacity=3, max_len=tiny_cfg.seq_len, kv="full", depth=8)
    seqs = [sequence(i, engine, PROMPTS[i], SETTINGS[i]) for i in (1, 2)]  # fixed depth 3, then an exit
    first = batch.row_plans(seqs)
    assert batch.row_plans(list(seqs)) is first and first.fixed_depth() is None
    alone_plans = batch.row_plans(seqs[:1])  # the exit row left: fixed depth 3 for the one that stays
    assert alone_plans is not first and alone_plans.fixed_depth() == 3 and alone_plans.max_steps.tolist() == [3]
    twin = sequence(3, engine, PROMPTS[1], SETTINGS[1])  # an equal plan in a new object: rebuilt, same depth
    assert batch.row_plans([twin]) is not alone_plans and batch.row_plans([twin]).fixed_depth() == 3
