"""Self-speculative decoding: greedy output identical to fixed-depth greedy decoding for any draft, a chunked
forward that equals the uncached model, and bad settings refused. Run: `pytest tests/infer/test_speculative.py`.
"""

import pytest
import torch
from support import random_model

from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.kv_cache import KVCache
from recurchat.infer.sampling import SamplingParams
from recurchat.infer.speculative import generate_speculative, parse_speculate


def test_a_chunk_after_a_prefill_equals_the_uncached_forward(tiny_cfg):
    m = random_model(tiny_cfg, seed=2)
    engine = Engine(m, dtype="fp32")
    seq = torch.randint(0, tiny_cfg.vocab_size, (1, 14), generator=torch.Generator().manual_seed(0))
    cache = KVCache(tiny_cfg, "full", 1, 14, 3)
    with torch.no_grad():
        engine._prefill(cache, seq[:, :6], torch.tensor([6]), 3, 3)
        chunk, _ = engine._chunk(cache, seq[:, 6:11], 6, 3)
        ref = m(seq[:, :11], num_recur=3)
    assert torch.allclose(chunk[0], ref[0, 6:11], atol=1e-4), (chunk[0] - ref[0, 6:11]).abs().max()


@pytest.mark.parametrize("draft_r,k", [(1, 1), (1, 4), (2, 3), (3, 6)])
def test_speculative_greedy_is_identical_to_fixed_depth_greedy(tiny_cfg, draft_r, k):
    m = random_model(tiny_cfg, seed=1)
    engine = Engine(m, dtype="fp32")
    prompt = torch.randint(0, tiny_cfg.vocab_size, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0),
                                RecurParams(num_recur=4))[0]
    spec = generate_speculative(engine, prompt, 20, num_recur=4, draft_r=draft_r, k=k)
    assert spec.tokens == reference.tokens
    assert spec.rounds <= len(spec.tokens) and 0 <= spec.accepted <= spec.drafted
    # stop tokens end the reply at the same place, and are not part of it
    stop = reference.tokens[7]
    stopped = generate_speculative(engine, prompt, 20, num_recur=4, draft_r=draft_r, k=k, stop_ids=(stop,))
    assert stopped.finish_reason == "stop" and stopped.tokens == reference.tokens[:reference.tokens.index(stop)]


@pytest.mark.parametrize("spec,message", [("4", "DRAFT_R:K"), ("a:b", "DRAFT_R:K"), ("0:4", ">= 1")])
def test_bad_speculate_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_speculate(spec)


def test_draft_depth_must_be_below_the_target(tiny_cfg):
    engine = Engine(random_model(tiny_cfg), dtype="fp32")
    with pytest.raises(UserError, match="DRAFT_R < the target depth"):
        generate_speculative(engine, [1, 2], 4, num_recur=2, draft_r=2, k=2)
