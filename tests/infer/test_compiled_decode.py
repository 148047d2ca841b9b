"""The compiled decode step (Engine(compile=True) → Runner.compile): fixed-depth steps run one torch.compile graph
and give what eager decoding gives — tokens, depths, scores, rows leaving the batch — while steps with an
exit criterion stay eager. Run: `pytest tests/infer/test_compiled_decode.py`."""

import pytest
import torch
import torch._dynamo
from support import random_model

from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.slow
def test_compiled_fixed_depth_decode_matches_eager(tiny_cfg):
    torch._dynamo.reset()
    m = random_model(tiny_cfg, seed=5)
    eager, compiled = Engine(m, dtype="fp32"), Engine(m, dtype="fp32", compile=True)
    prompts = [[1, 2, 3, 4], [5, 6]]
    # the first row leaves after 2 tokens: the second decodes on alone, from a cache row that is not row 0
    sampling = [SamplingParams(max_tokens=n, temperature=0.0) for n in (2, 6)]
    recur = RecurParams(num_recur=3, kv="full")
    before = graphs()
    want, got = eager.generate(prompts, sampling, recur), compiled.generate(prompts, sampling, recur)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    assert [g.depths for g in got] == [g.depths for g in want]
    assert graphs() > before  # the fixed-depth steps did run compiled
    # teacher-forced scoring decodes through the same step: the same nll, to float tolerance
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    nll_e, depth_e, _ = eager.score(x[:, :-1], x[:, 1:], recur)
    nll_c, depth_c, _ = compiled.score(x[:, :-1], x[:, 1:], recur)
    assert torch.allclose(nll_c, nll_e, atol=1e-4) and torch.equal(depth_c, depth_e)


def test_exit_steps_stay_eager_under_compile(tiny_cfg):
    torch._dynamo.reset()
    m = random_model(tiny_cfg, seed=6)
    recur = RecurParams(exit="kl:1e-2", max_recur=6)
    sp = SamplingParams(max_tokens=5, temperature=0.0)
    before = graphs()
    got = Engine(m, dtype="fp32", compile=True).generate([[1, 2, 3], [4, 5]], sp, recur)
    assert graphs() == before  # nothing was compiled: every step had a criterion to check
    want = Engine(m, dtype="fp32").generate([[1, 2, 3], [4, 5]], sp, recur)
    assert [g.tokens for g in got] == [g.tokens for g in want] and [g.depths for g in got] == [g.depths for g in want]
