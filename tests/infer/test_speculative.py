"""Self-speculative decoding: greedy output identical to fixed-depth greedy decoding for any draft (one row or a
batch of rows at different positions), sampled tokens distributed exactly as fixed-depth sampling, a chunked forward
that equals the uncached model, and bad settings refused. Run: `pytest tests/infer/test_speculative.py`.
"""

import pytest
import torch
from support import random_model

from recurchat.config import ModelConfig
from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.kv_cache import KVCache
from recurchat.infer.sampling import SamplingParams, next_token_probs
from recurchat.infer.speculative import parse_speculate, speculate


def test_a_chunk_after_a_prefill_equals_the_uncached_forward(tiny_cfg):
    m = random_model(tiny_cfg, seed=2)
    engine = Engine(m, dtype="fp32")
    seq = torch.randint(0, tiny_cfg.vocab_size, (1, 14), generator=torch.Generator().manual_seed(0))
    cache = KVCache(tiny_cfg, "full", 1, 14, 3)
    with torch.no_grad():
        engine.runner.prefill(cache, seq[:, :6], torch.tensor([6]), 3, 3)
        chunk, _ = engine.runner.chunk(cache, seq[:, 6:11], 6, 3)
        ref = m(seq[:, :11], num_recur=3)
    assert torch.allclose(chunk[0], ref[0, 6:11], atol=1e-4), (chunk[0] - ref[0, 6:11]).abs().max()


def test_chunks_at_a_different_start_per_row_equal_the_uncached_forward(tiny_cfg):
    m = random_model(tiny_cfg, seed=2)
    engine = Engine(m, dtype="fp32")
    seqs = torch.randint(0, tiny_cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    lens, cache = torch.tensor([4, 7, 5]), KVCache(tiny_cfg, "full", 3, 16, 3)
    with torch.no_grad():
        engine.runner.prefill(cache, seqs[:, :7], lens, 3, 3)  # rows padded to 7; each row's chunk overwrites its padding
        chunk = torch.stack([seqs[b, int(lens[b]):int(lens[b]) + 5] for b in range(3)])
        logits, _ = engine.runner.chunk(cache, chunk, lens, 3)
        for b in range(3):
            ref = m(seqs[b:b + 1, :int(lens[b]) + 5], num_recur=3)[0, int(lens[b]):]
            assert torch.allclose(logits[b], ref, atol=1e-4), (b, (logits[b] - ref).abs().max())


@pytest.mark.parametrize("draft_r,k", [(1, 1), (1, 4), (2, 3), (3, 6)])
def test_speculative_greedy_is_identical_to_fixed_depth_greedy(tiny_cfg, draft_r, k):
    m = random_model(tiny_cfg, seed=1)
    engine = Engine(m, dtype="fp32")
    prompt = torch.randint(0, tiny_cfg.vocab_size, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    reference = engine.generate([prompt], greedy, RecurParams(num_recur=4))[0]
    spec = speculate(engine, [prompt], greedy, num_recur=4, draft_r=draft_r, k=k)[0]
    assert spec.tokens == reference.tokens
    assert spec.rounds <= len(spec.tokens) and 0 <= spec.accepted <= spec.drafted
    # stop tokens end the reply at the same place, and are not part of it
    stop = reference.tokens[7]
    stopped = speculate(engine, [prompt], SamplingParams(max_tokens=20, temperature=0.0, stop_ids=(stop,)),
                        num_recur=4, draft_r=draft_r, k=k)[0]
    assert stopped.finish_reason == "stop" and stopped.tokens == reference.tokens[:reference.tokens.index(stop)]


def test_a_batch_of_rows_at_different_positions_decodes_like_each_row_alone(tiny_cfg):
    m = random_model(tiny_cfg, seed=6)
    engine = Engine(m, dtype="fp32")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, tiny_cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 9, 1, 6, 12)]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (14, 5, 19, 1, 12)]
    reference = [engine.generate([p], s, RecurParams(num_recur=4))[0] for p, s in zip(prompts, params)]
    params[2] = SamplingParams(max_tokens=19, temperature=0.0, stop_ids=(reference[2].tokens[9],))
    specs = speculate(engine, prompts, params, num_recur=4, draft_r=1, k=3)
    assert [s.tokens for s in specs[:2] + specs[3:]] == [g.tokens for g in reference[:2] + reference[3:]]
    assert specs[2].tokens == reference[2].tokens[:reference[2].tokens.index(reference[2].tokens[9])]
    assert [s.finish_reason for s in specs] == ["length", "length", "stop", "length", "length"]
    assert len({s.accepted for s in specs}) > 1  # rows did move apart


def exact_marginals(model, prompt, temperature, top_k, top_p, second_r):
    """Exact distributions of the 2nd and 3rd sampled token when every token is sampled at depth 4 — except the
    2nd, which comes from depth `second_r` (4 again for the truth, 1 for what accepting every draft would give)."""
    V = model.cfg.vocab_size

    def dist(prefixes, r):
        with torch.no_grad():
            return next_token_probs(model(torch.tensor(prefixes), num_recur=r)[:, -1], temperature, top_k, top_p)

    p1 = dist([prompt], 4)[0]
    p2 = dist([prompt + [a] for a in range(V)], second_r)  # [a, b]
    p3 = dist([prompt + [a, b] for a in range(V) for b in range(V)], 4).view(V, V, V)
    joint12 = p1[:, None] * p2
    return joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 6, 0.9)])
def test_speculative_sampling_draws_from_the_target_distribution(temperature, top_k, top_p):
    cfg = ModelConfig(vocab_size=16, d_model=32, n_head=2, n_kv_head=1, n_prelude=1, n_shared=1, n_coda=1,
                      mean_recur=3, r_max=8, seq_len=16)
    m, prompt, n = random_model(cfg, seed=0), [1, 2, 3, 4], 4000
    truth, wrong = exact_marginals(m, prompt, temperature, top_k, top_p, 4), \
        exact_marginals(m, prompt, temperature, top_k, top_p, 1)
    assert 0.5 * float((truth[0] - wrong[0]).abs().sum()) > 0.15  # the draft depth's distribution is far off
    params = [SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=i)
              for i in range(n)]
    specs = speculate(Engine(m, dtype="fp32"), [prompt] * n, params, num_recur=4, draft_r=1, k=3)
    assert 0.2 < sum(s.accepted for s in specs) / sum(s.drafted for s in specs) < 0.95  # drafts are rejected too
    for i, exact in ((1, truth[0]), (2, truth[1])):
        seen = torch.bincount(torch.tensor([s.tokens[i] for s in specs]), minlength=cfg.vocab_size) / n
        # sampling noise in the total variation of 4000 draws over 16 tokens is ~0.02
        assert 0.5 * float((seen - exact).abs().sum()) < 0.05
    seen = torch.bincount(torch.tensor([s.tokens[1] for s in specs]), minlength=cfg.vocab_size) / n
    assert 0.5 * float((seen - wrong[0]).abs().sum()) > 0.1


@pytest.mark.parametrize("spec,message", [("4", "DRAFT_R:K"), ("a:b", "DRAFT_R:K"), ("0:4", ">= 1")])
def test_bad_speculate_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_speculate(spec)


def test_draft_depth_must_be_below_the_target(tiny_cfg):
    engine = Engine(random_model(tiny_cfg), dtype="fp32")
    with pytest.raises(UserError, match="DRAFT_R < the target depth"):
        speculate(engine, [[1, 2]], SamplingParams(max_tokens=4), num_recur=2, draft_r=2, k=2)
