"""The compiled decode step (Engine(compile=True) → Runner.compile): fixed-depth steps run one torch.compile graph
and give what eager decoding gives — tokens, depths, scores, rows leaving the batch — while steps with an
exit criterion stay eager; speculative verification chunks run compiled too. Run: `pytest tests/infer/test_compiled_decode.py`."""

from dataclasses import replace

import pytest
import torch
import torch._dynamo
from support import random_model

from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams
from recurchat.infer.speculative import speculate


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


def teacher_forced_nll(engine: Engine, vocab_size: int) -> torch.Tensor:
    x = torch.randint(0, vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    return engine.score(x[:, :-1], x[:, 1:], RecurParams(num_recur=2, kv="last"))[0]


def stream_changing_weights(model, compile: bool, change_after: int | None) -> list[int]:
    """Greedy tokens of one stream, the values' weights tripled in place after `change_after` steps (None: never)."""
    tokens = []
    engine = Engine(model, dtype="fp32", compile=compile)
    for step, events in enumerate(engine.stream([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0.0),
                                                RecurParams(num_recur=2, kv="last"))):
        tokens += [ev.token for ev in events]
        if step == change_after:
            with torch.no_grad():  # in place, as an optimizer step or load_state_dict would
                for attn in model.attention_layers:
                    attn.c_v.weight.mul_(3.0)
    return tokens


@pytest.mark.slow
def test_compiled_decode_follows_weights_changed_in_place(tiny_cfg):
    # the compiled step reads each attention layer's fused QKV weight as it stands, and nothing eager runs between
    # two decode steps of a stream: the runner refreshes the fused weights before each compiled step
    torch._dynamo.reset()
    unchanged = stream_changing_weights(random_model(tiny_cfg, seed=7), True, None)
    compiled = stream_changing_weights(random_model(tiny_cfg, seed=7), True, 2)
    assert compiled == stream_changing_weights(random_model(tiny_cfg, seed=7), False, 2)
    assert compiled[:3] == unchanged[:3] and compiled != unchanged  # the change took effect from the fourth token


@pytest.mark.slow
def test_compiled_runners_keep_their_own_graphs(tiny_cfg):
    # module guards are dropped, so two models of the same shapes that differ only in a module attribute (QK-norm)
    # must not share a graph: each runner compiles its own copy of the step
    torch._dynamo.reset()
    normed, plain = random_model(tiny_cfg, seed=8), random_model(replace(tiny_cfg, qk_norm=False), seed=8)
    first = teacher_forced_nll(Engine(normed, dtype="fp32", compile=True), tiny_cfg.vocab_size)
    second = teacher_forced_nll(Engine(plain, dtype="fp32", compile=True), tiny_cfg.vocab_size)
    assert torch.allclose(first, teacher_forced_nll(Engine(normed, dtype="fp32"), tiny_cfg.vocab_size), atol=1e-4)
    assert torch.allclose(second, teacher_forced_nll(Engine(plain, dtype="fp32"), tiny_cfg.vocab_size), atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-3)


@pytest.mark.slow
def test_compiled_speculation_verifies_in_a_graph_and_keeps_greedy_output(tiny_cfg):
    # verification chunks (a start per row) run compiled: two rows at their own positions, greedy identical to
    # fixed-depth greedy (fp32)
    torch._dynamo.reset()
    m = random_model(tiny_cfg, seed=9)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, tiny_cfg.vocab_size, (n,), generator=gen).tolist() for n in (4, 9)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    want = Engine(m, dtype="fp32").generate(prompts, greedy, RecurParams(num_recur=3))
    compiled = Engine(m, dtype="fp32", compile=True)
    chunks = []  # the token blocks the compiled pass verified
    original = compiled.runner.compiled_chunk
    compiled.runner.compiled_chunk = lambda cache, idx, *rest: chunks.append(tuple(idx.shape)) or original(
        cache, idx, *rest)
    got = speculate(compiled, prompts, greedy, num_recur=3, draft_r=1, k=3)
    assert [s.tokens for s in got] == [g.tokens for g in want]
    assert chunks[0] == (2, 4)  # both rows' first round: the decided token and 3 drafts


@pytest.mark.slow
def test_compiled_batch_one_decode_copies_no_matmul_input_and_matches_eager(tiny_cfg):
    # a batch-1 step's GEMVs are decomposed into code inductor generates; as aten mm calls each would first copy its
    # input (aten::clone: inductor gives the size-1 row a stride of 0). Warm start, a ring cache and an attention
    # window: compiled paths no other test decodes. A head wider than the decomposition takes (N > 2048) stays an
    # aten mm, and reads a 2-D input so that it does not copy either.
    from torch.profiler import profile
    torch._dynamo.reset()
    cfg = replace(tiny_cfg, attn_window=3, vocab_size=4096)
    m = random_model(cfg, seed=10)
    recur = RecurParams(num_recur=3, kv="ring:2", warm_start=True)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    compiled = Engine(m, dtype="fp32", compile=True)
    want = Engine(m, dtype="fp32").generate([[1, 2, 3, 4, 5]], greedy, recur)
    assert [g.tokens for g in compiled.generate([[1, 2, 3, 4, 5]], greedy, recur)] == [g.tokens for g in want]
    with profile() as prof:
        got = compiled.generate([[1, 2, 3, 4, 5]], greedy, recur)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    events = prof.events()
    assert sum(e.name.startswith("## Call CompiledFxGraph") for e in events) == 7  # seven compiled decode steps
    assert not [e for e in events if e.name == "aten::clone" and inside_compiled_graph(e)]


def inside_compiled_graph(event) -> bool:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("## Call CompiledFxGraph"):
        parent = parent.cpu_parent
    return parent is not None
