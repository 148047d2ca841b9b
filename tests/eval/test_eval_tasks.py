"""Task scoring: --tasks spec parsing, the choice picker on crafted numbers, multiple-choice scoring on the benchmark
fixtures and generative scoring on hops/GSM8K, with a tiny random RecurrentLM and a tokenizer trained here.

Run: `pytest tests/eval/test_eval_tasks.py`.
"""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from support import one_thread, random_model  # noqa: F401  (one_thread is an autouse fixture)

from recurchat.config import ModelConfig
from recurchat.data.tasks import get_task, stream
from recurchat.data.tasks.benchmarks import load_benchmark, mc_prompt
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.eval.tasks import (
    centered,
    continuation_logprobs,
    eval_generative,
    mc_context,
    number_matches,
    parse_task_spec,
    parse_task_specs,
    pick_choice,
    prompt_and_check,
    score_mc,
)
from recurchat.infer.engine import Engine, RecurParams
from recurchat.model.recurrent import RecurrentLM

FIXTURES = Path(__file__).parents[1] / "fixtures" / "benchmarks"
MC_FIXTURES = [("arc-easy", "arc_easy.jsonl"), ("mmlu", "mmlu.parquet"), ("hellaswag", "hellaswag.jsonl")]
CFG = ModelConfig(vocab_size=300, d_model=32, n_head=2, n_kv_head=1, n_prelude=1, n_shared=1, n_coda=1,
                  mean_recur=2, r_max=4, seq_len=128)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [topics[k] for k in sorted(topics)[:8]]
    texts += [e.prompt + " " + e.answer for e in stream(get_task("hops"), "train", 0, 200)]
    # Frequent " A" … " E" make the answer letters single tokens, so "letter" mode takes its one-forward path.
    texts += ["Answer: A B C D E"] * 3000
    return Tokenizer.train(texts, 300)


@pytest.fixture(scope="module")
def model() -> RecurrentLM:
    return random_model(CFG)


# ---- specs --------------------------------------------------------------------------------------------------
def test_parse_task_spec_good():
    assert (parse_task_spec("bpb").kind, parse_task_spec("bpb").path) == ("bpb", None)
    for name in ("hops", "arith", "parity"):
        assert parse_task_spec(name).kind == "builtin"
    spec = parse_task_spec(" arc-easy:/data/arc easy.jsonl ")
    assert (spec.name, spec.kind, spec.path) == ("arc-easy", "mc", "/data/arc easy.jsonl")
    assert parse_task_spec("mmlu:C:\\mmlu\\test.parquet").path == "C:\\mmlu\\test.parquet"  # only 1st colon splits
    assert parse_task_spec("gsm8k:g.parquet").kind == "gen"
    for name in ("arc-challenge", "hellaswag"):
        assert parse_task_spec(f"{name}:x").kind == "mc"
    assert [s.name for s in parse_task_specs(["bpb", "hops", " "])] == ["bpb", "hops"]


@pytest.mark.parametrize("spec, message", [
    ("nope", "choices: bpb, arith, chain, hops, parity, arc-easy:PATH"),
    ("mmlu", "needs a data path"),
    ("hellaswag: ", "needs a data path"),
    ("hops:foo", "bad level range"),
    ("chain:20-30", "has no levels"),
    ("bpb:x", "takes no path"),
])
def test_parse_task_spec_bad(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_task_spec(spec)


def test_parse_task_specs_rejects_duplicates_and_empty():
    with pytest.raises(UserError, match="more than once: hops"):
        parse_task_specs(["hops", "bpb", "hops"])
    with pytest.raises(UserError, match="no tasks"):
        parse_task_specs([])


def test_centered():
    assert centered(0.5, 0.5) == 0.0
    assert centered(1.0, 0.25) == 1.0
    assert centered(0.0, 0.25) == pytest.approx(-1 / 3)
    assert centered(0.3, 0.0) == 0.3


# ---- multiple choice ----------------------------------------------------------------------------------------
def test_pick_choice_sum_and_length_normalised_disagree():
    # choice 0: short and likely in total; choice 1: long but more likely per byte
    assert pick_choice([-4.0, -6.0], [2, 6]) == (0, 1)
    assert pick_choice([-3.0, -3.0, -9.0], [3, 3, 1]) == (0, 0)  # ties go to the first index
    assert pick_choice([-1.0, -2.0], [0, 5]) == (0, 1)  # zero length counts as 1
    with pytest.raises(ValueError):
        pick_choice([-1.0], [1, 2])


@pytest.mark.parametrize("name, file", MC_FIXTURES)
def test_score_mc_loglik_on_fixtures(model, tokenizer, name, file):
    questions = load_benchmark(name, FIXTURES / file)
    results = score_mc(model, tokenizer, questions, num_recur=2)
    assert len(results) == len(questions)
    for q, r in zip(questions, results):
        assert set(r) == {"correct", "correct_norm", "pred", "pred_norm", "label", "logprobs", "mean_depth",
                          "subject"}
        assert len(r["logprobs"]) == len(q.choices) and all(lp < 0 for lp in r["logprobs"])
        assert 0 <= r["pred"] < len(q.choices) and r["label"] == q.label
        assert r["correct"] == (r["pred"] == q.label) and r["mean_depth"] == 2.0
        # pred / pred_norm are the argmax of the summed log-probs and of the log-probs per character of the choice
        # (without the joining space, as lm-eval's acc_norm counts), recomputed here
        lps = r["logprobs"]
        per_char = [lp / len(c) for lp, c in zip(lps, q.choices)]
        assert r["pred"] == lps.index(max(lps)) and r["pred_norm"] == per_char.index(max(per_char))
        assert r["correct_norm"] == (r["pred_norm"] == q.label)


def test_loglik_equals_a_direct_forward_and_ignores_batching(model, tokenizer):
    questions = load_benchmark("arc-easy", FIXTURES / "arc_easy.jsonl")
    batched = score_mc(model, tokenizer, questions, num_recur=3, batch_size=64)
    single = score_mc(model, tokenizer, questions, num_recur=3, batch_size=1)
    for a, b in zip(batched, single):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    q = questions[0]
    ctx, cont = tokenizer.encode(mc_context(q)), tokenizer.encode(" " + q.choices[2])
    ids = torch.tensor([[tokenizer.bos_id] + ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1], num_recur=3).float(), dim=-1)[0]
    start = 1 + len(ctx)  # position of the first continuation token in ids
    expected = sum(float(logp[start + k - 1, t]) for k, t in enumerate(cont))
    assert batched[0]["logprobs"][2] == pytest.approx(expected, abs=1e-4)


def test_long_context_is_cropped_from_the_left(model, tokenizer):
    T = CFG.seq_len
    pairs = [("word " * 400, " end"), ("short", " end"), ("word " * 300, " end")]
    out = continuation_logprobs(model, tokenizer, pairs, num_recur=2)
    cont = tokenizer.encode(" end")
    ids = [tokenizer.bos_id] + tokenizer.encode("word " * 400) + cont
    assert len(ids) > T + 1  # too long for the context: must be cropped
    kept = ids[-(T + 1):]  # BOS and the context's start are dropped, the continuation is kept whole
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([kept[:-1]]), num_recur=2).float(), dim=-1)[0]
    start = T + 1 - len(cont)  # index of the first continuation token in `kept`
    expected = sum(float(logp[start + k - 1, t]) for k, t in enumerate(cont))
    assert out[0][0] == pytest.approx(expected, abs=1e-4)
    # a shorter context with the same last T tokens scores the same: only the window that fits is seen
    shorter = [tokenizer.bos_id] + tokenizer.encode("word " * 300) + cont
    assert len(shorter) > T + 1 and shorter[-(T + 1):] == kept
    assert out[2][0] == pytest.approx(out[0][0], abs=1e-4)
    assert out[1][0] != pytest.approx(out[0][0], abs=1e-3)


def test_letter_mode_matches_scoring_the_letters_as_continuations(model, tokenizer):
    assert all(len(tokenizer.encode(f" {c}")) == 1 for c in "ABCDE")  # the one-forward path is the one tested
    questions = load_benchmark("mmlu", FIXTURES / "mmlu.parquet")
    results = score_mc(model, tokenizer, questions, num_recur=2, mode="letter")
    for q, r in zip(questions, results):
        expected = continuation_logprobs(model, tokenizer, [(mc_prompt(q), f" {c}") for c in "ABCD"], num_recur=2)
        assert r["logprobs"] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
        assert r["pred"] == r["pred_norm"]  # " A", " B", … are equally long, so normalising changes nothing
    with pytest.raises(UserError, match="unknown multiple-choice mode"):
        score_mc(model, tokenizer, questions, 2, mode="guess")


def test_score_mc_under_exit(model, tokenizer):
    questions = load_benchmark("hellaswag", FIXTURES / "hellaswag.jsonl")
    engine = Engine(model, dtype="fp32")
    # Cached decoding at a fixed exit depth must equal the uncached forward at that depth.
    fixed = score_mc(model, tokenizer, questions, 2, engine=engine, recur=RecurParams(exit="fixed:2", max_recur=4))
    ref = score_mc(model, tokenizer, questions, 2)
    for a, b in zip(fixed, ref):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-3) and a["mean_depth"] == 2.0
    adaptive = score_mc(model, tokenizer, questions, None, engine=engine,
                        recur=RecurParams(exit="latent:1e9", max_recur=4))
    assert all(1.0 <= r["mean_depth"] <= 4.0 for r in adaptive)


# ---- generative ---------------------------------------------------------------------------------------------
def test_eval_generative_hops(model, tokenizer):
    examples = stream(get_task("hops"), "test", 0, 6)
    engine = Engine(model, dtype="fp32")
    results = eval_generative(engine, tokenizer, examples, RecurParams(num_recur=3), max_tokens=8, batch_size=4)
    assert len(results) == len(examples)
    for ex, r in zip(examples, results):
        assert set(r) == {"correct", "difficulty", "mean_depth", "depths", "output"}
        assert r["difficulty"] == ex.difficulty and isinstance(r["output"], str)
        assert 1 <= len(r["depths"]) <= 8 and set(r["depths"]) == {3} and r["mean_depth"] == 3.0
        assert r["correct"] == get_task("hops").check(r["output"], ex)
        # the checker the scorer uses accepts the true answer and rejects a wrong one
        _, check, _ = prompt_and_check(ex)
        assert check(f"The answer is {ex.answer}") and not check(f"{int(ex.answer) + 1}")
    again = eval_generative(engine, tokenizer, examples, RecurParams(num_recur=3), max_tokens=8, batch_size=16)
    assert [r["output"] for r in again] == [r["output"] for r in results]  # batching and ordering do not matter


def test_eval_generative_with_exit(model, tokenizer):
    examples = stream(get_task("hops"), "test", 1, 4)
    results = eval_generative(Engine(model, dtype="fp32"), tokenizer, examples,
                              RecurParams(exit="latent:1e9", max_recur=4), max_tokens=6)
    for r in results:
        assert r["depths"][0] == 2  # the first token comes from the prefill, at r̄
        assert all(1 <= d <= 4 for d in r["depths"])
        assert r["mean_depth"] == pytest.approx(sum(r["depths"]) / len(r["depths"]))


def test_eval_generative_gsm8k(model, tokenizer):
    questions = load_benchmark("gsm8k", FIXTURES / "gsm8k.parquet")
    results = eval_generative(Engine(model, dtype="fp32"), tokenizer, questions, RecurParams(num_recur=1), max_tokens=4)
    assert [r["difficulty"] for r in results] == [None] * len(questions)
    assert all(r["correct"] == number_matches(r["output"], q.answer) for q, r in zip(questions, results))


def test_number_matches():
    assert number_matches("so she has 1,234 left.", "1234")
    assert number_matches("3 then 10.0", "10")
    assert number_matches("it is -5", "-5")
    assert not number_matches("12 and then 13", "12")
    assert not number_matches("no number here", "3")
