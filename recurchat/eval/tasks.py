"""Task scoring at a recursion depth: `--tasks` spec parsing, generative scoring (hops/arith/parity, GSM8K) through
the inference engine, and multiple-choice scoring (ARC, MMLU, HellaSwag) by log-likelihood or answer letter.

    recurchat eval --ckpt DIR --tasks bpb,hops,arc-easy:data/arc_easy.jsonl --recur 1,2,4 --exit kl:0.03

Multiple choice ("loglik", the default): each choice is scored by the summed log-probability of its tokens
(" " + choice) after the context ("Question: …\\nAnswer:"; HellaSwag's context is the passage itself), in one
batched forward at depth r. `acc` picks the largest unnormalised sum; `acc_norm` divides by the choice's length
in characters first (without the space that joins it to the context), as lm-evaluation-harness does: the sum alone
favours short choices. (Until the SmolLM2 check in docs/pretrained/ this counted the joining space too, which moved
acc_norm by up to 1.3 points against lm-eval on the same items.) "letter" scores
`mc_prompt(q)` by the next-token log-probs of " A", " B", …. Under an exit criterion the same rows are scored
teacher-forced through `Engine.score`, so every token picks its own depth exactly as in generation.
Exercised by `pytest tests/eval/test_eval_tasks.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from recurchat.data.chat import render_prompt
from recurchat.data.tasks import get_task
from recurchat.data.tasks.base import Example
from recurchat.data.tasks.benchmarks import BENCHMARKS, LETTERS, GenQuestion, MCQuestion, mc_prompt
from recurchat.data.tasks.probes import PROBES, is_probe, parse_probe
from recurchat.data.tasks.registry import REGISTRY
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams
from recurchat.model.hardware import DtypeChoice
from recurchat.model.recurrent import RecurrentLM
from recurchat.model.scoring import scoring

GENERATIVE_BENCHMARKS = ("gsm8k",)
MC_MODES = ("loglik", "letter")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the key results are stored under: "bpb", "hops", "arc-easy", …
    kind: str  # "bpb" | "builtin" (procedural, generative) | "mc" (multiple-choice benchmark) | "gen" (GSM8K) |
    #            "probe" (a labelled-sequence probe, probe:NAME:LO-HI)
    path: str | None = None  # benchmark data location

    @property
    def has_accuracy(self) -> bool:
        return self.kind != "bpb"


def task_choices() -> list[str]:
    return ["bpb", *sorted(REGISTRY), *(f"{name}:PATH" for name in BENCHMARKS),
            *(f"probe:{name}:LO-HI{PROBES[name].option_help}" for name in sorted(PROBES))]


def parse_task_spec(spec: str) -> TaskSpec:
    """One `--tasks` item: "bpb", a builtin task (NAME or NAME:LO-HI), or "BENCHMARK:PATH"; UserError listing the
    choices."""
    # partition on the first colon only: the path may itself hold colons (Windows drives, URLs-like names)
    name, sep, path = spec.strip().partition(":")
    name, path = name.strip(), path.strip()
    if name == "bpb":
        if sep:
            raise UserError(f"task {name!r} takes no path (got {spec!r})")
        return TaskSpec(name, "bpb")
    if is_probe(spec):
        return TaskSpec(parse_probe(spec).name, "probe")
    if name in REGISTRY:  # NAME or NAME:LO-HI (some of its difficulty levels)
        get_task(spec.strip())
        return TaskSpec(spec.strip(), "builtin")
    if name in BENCHMARKS:
        if not path:
            raise UserError(f"benchmark {name!r} needs a data path: {name}:PATH (a .jsonl/.parquet/.arrow file or "
                            f"a directory)")
        return TaskSpec(name, "gen" if name in GENERATIVE_BENCHMARKS else "mc", path)
    raise UserError(f"unknown task {spec!r} (choices: {', '.join(task_choices())})")


def parse_task_specs(specs: Sequence[str]) -> list[TaskSpec]:
    """Several specs; a task named twice would overwrite its own results, so that is a UserError."""
    parsed = [parse_task_spec(s) for s in specs if s.strip()]
    names = [p.name for p in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"task(s) given more than once: {', '.join(dupes)}")
    if not parsed:
        raise UserError(f"no tasks given (choices: {', '.join(task_choices())})")
    return parsed


def centered(acc: float, chance: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1: (acc − chance) / (1 − chance)."""
    if chance >= 1:
        raise ValueError(f"chance must be < 1, got {chance}")
    return (acc - chance) / (1 - chance)


def mc_chance(questions: Sequence[MCQuestion]) -> float:
    """Expected accuracy of uniform guessing; ARC mixes 3-, 4- and 5-choice questions, so it is a mean."""
    return sum(1 / len(q.choices) for q in questions) / len(questions) if questions else 0.0


# ---- generative ---------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def number_matches(text: str, answer: str) -> bool:
    """GSM8K rule: the last number in `text` (commas dropped) equals the reference answer numerically."""
    found = _NUMBER.findall(text)
    if not found:
        return False
    try:
        return math.isclose(float(found[-1].replace(",", "")), float(answer), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


def prompt_and_check(example: Example | GenQuestion) -> tuple[str, Callable[[str], bool], int | None]:
    """(user message, correctness check on the model's output text, difficulty or None) for one example."""
    if isinstance(example, GenQuestion):
        return example.question, lambda text: number_matches(text, example.answer), None
    task = get_task(example.task)
    return example.prompt, lambda text: bool(task.check(text, example)), example.difficulty


def eval_generative(engine: Engine, tokenizer: Tokenizer, examples: Sequence[Example | GenQuestion], recur: RecurParams,
                    max_tokens: int = 16, batch_size: int = 16) -> list[dict]:
    """Greedy answers in the SFT chat format, one dict per example (in input order):
    {"correct", "difficulty" (None for GSM8K), "mean_depth", "depths", "output"}.

    `depths` holds the recursion depth of every decided token, the closing <|assistant_end|> included (its
    compute was spent); the first token's depth is the prefill depth. A prompt that would leave fewer than
    `max_tokens` positions (or half the context, whichever is less) for the answer is cropped from the left,
    keeping the question's end and <|assistant_start|>.
    """
    stop_ids = (tokenizer.special_id("assistant_end"), tokenizer.bos_id)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_ids=stop_ids, seed=0)
    room = min(engine.cfg.seq_len - 1, max(engine.cfg.seq_len // 2, engine.cfg.seq_len - max_tokens))
    prepared = []
    for ex in examples:
        text, check, difficulty = prompt_and_check(ex)
        ids = render_prompt(tokenizer, [{"role": "user", "content": text}])
        prepared.append((ids[-room:], check, difficulty))
    # Similar lengths share a batch, so little prefill is spent on padding.
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][0]))
    results: list[dict | None] = [None] * len(prepared)
    with scoring(engine.model, engine.dtype):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            tokens: list[list[int]] = [[] for _ in chunk]
            depths: list[list[int]] = [[] for _ in chunk]
            for events in engine.stream([prepared[i][0] for i in chunk], sampling, recur):
                for ev in events:
                    depths[ev.row].append(ev.depth)
                    if ev.finish_reason != "stop":
                        tokens[ev.row].append(ev.token)
            for j, i in enumerate(chunk):
                output = tokenizer.decode(tokens[j])
                _, check, difficulty = prepared[i]
                results[i] = {"correct": check(output), "difficulty": difficulty, "output": output,
                              "depths": depths[j], "mean_depth": sum(depths[j]) / max(len(depths[j]), 1)}
    return results  # type: ignore[return-value]


# ---- multiple choice ----------------------------------------------------------------------------------------
def pick_choice(choice_logprobs: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """(index with the largest summed log-prob, index with the largest log-prob per unit of length).

    Ties go to the first index. A zero length counts as 1 so an empty continuation cannot divide by zero.
    """
    if not choice_logprobs or len(choice_logprobs) != len(lengths):
        raise ValueError("need one length per choice and at least one choice")
    best = max(range(len(choice_logprobs)), key=lambda i: (choice_logprobs[i], -i))
    norm = [lp / max(n, 1) for lp, n in zip(choice_logprobs, lengths)]
    best_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return best, best_norm


def mc_context(q: MCQuestion) -> str:
    """The text each choice continues: HellaSwag's passage runs straight into its ending, as in lm-eval."""
    return q.question if q.task == "hellaswag" else f"Question: {q.question}\nAnswer:"


@dataclass
class _Row:
    ids: list[int]  # already cropped to seq_len + 1
    n_scored: int  # how many trailing tokens are the continuation


def token_rows(bos_id: int, pairs: Sequence[tuple[list[int], list[int]]], seq_len: int) -> list[_Row]:
    """Rows of BOS + context + continuation tokens, cropped from the left to seq_len + 1 (the choice must be
    seen), scoring the continuation's tokens."""
    rows = []
    for ctx, cont in pairs:
        ids = ([bos_id] + list(ctx) + list(cont))[-(seq_len + 1):]
        rows.append(_Row(ids, min(len(cont), len(ids) - 1)))
    return rows


def _rows(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int) -> list[_Row]:
    # Context and continuation are encoded separately, so the continuation's tokens are the same whatever
    # precedes them; BOS first because pretraining documents start with it.
    contexts = tokenizer.encode_batch([c for c, _ in pairs])
    conts = tokenizer.encode_batch([c for _, c in pairs])
    return token_rows(tokenizer.bos_id, list(zip(contexts, conts)), seq_len)


def _batches(rows: list[_Row], batch_size: int, pad_id: int):
    """(row indices, x, y) with y = −1 everywhere but the continuation's targets; similar lengths batched."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = max(len(rows[i].ids) for i in chunk) - 1
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for j, i in enumerate(chunk):
            ids, n = rows[i].ids, rows[i].n_scored
            x[j, :len(ids) - 1] = torch.tensor(ids[:-1])
            if n:
                y[j, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[-n:])
        yield chunk, x, y


@dataclass
class RowScore:
    logprob: float  # summed log-prob of the continuation's tokens
    depth: float  # mean recursions over them
    greedy: bool  # every continuation token is the argmax given what precedes it


def score_rows(model: RecurrentLM, rows: list[_Row], pad_id: int, num_recur: int | None = None,
               batch_size: int = 32, engine: Engine | None = None, recur: RecurParams | None = None,
               dtype: DtypeChoice | None = None) -> list[RowScore]:
    """Score each row's continuation. At a fixed depth one forward scores a batch (depth = num_recur, or 0 for the
    standard model); with `engine` and `recur`, `Engine.score` decodes teacher-forced so each token exits by the
    criterion."""
    cfg = model.cfg
    out: list[RowScore] = [RowScore(0.0, 0.0, True)] * len(rows)
    fixed_depth = float(num_recur or cfg.mean_recur) if cfg.n_shared else 0.0
    with scoring(model, dtype) as device:
        for chunk, x, y in _batches(rows, batch_size, pad_id):
            scored = y >= 0
            if engine is not None and recur is not None:
                nll, depth, top = (t.cpu() for t in engine.score(x, y.clamp(min=0), recur))
                nll, depth = nll * scored, depth.float()
            else:
                logp = torch.log_softmax(model(x.to(device), num_recur=num_recur).float(), dim=-1).cpu()
                nll = -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * scored
                depth, top = torch.full(x.shape, fixed_depth), logp.argmax(dim=-1)
            for j, i in enumerate(chunk):
                n, mask = int(scored[j].sum()), scored[j]
                out[i] = RowScore(-float(nll[j][mask].double().sum()), float(depth[j][mask].mean()) if n
                                  else fixed_depth, bool((top[j][mask] == y[j][mask]).all()))
    return out


def continuation_logprobs(model: RecurrentLM, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]],
                          num_recur: int | None = None, batch_size: int = 32, engine: Engine | None = None,
                          recur: RecurParams | None = None,
                          dtype: DtypeChoice | None = None) -> list[tuple[float, float]]:
    """For each (context, continuation): (summed log-prob of the continuation's tokens, mean depth over them)."""
    scores = score_rows(model, _rows(tokenizer, pairs, model.cfg.seq_len), tokenizer.pad_id, num_recur, batch_size,
                        engine, recur, dtype)
    return [(s.logprob, s.depth) for s in scores]


def _letter_logprobs(model: RecurrentLM, tokenizer: Tokenizer, questions: Sequence[MCQuestion],
                     num_recur: int | None, batch_size: int,
                     dtype: DtypeChoice | None) -> list[list[float]] | None:
    """One forward per question, log-probs of the " A"/" B"/… tokens at the last position; None when a letter is
    not a single token in this vocabulary (the caller then scores " A" etc. as ordinary continuations)."""
    n_max = max(len(q.choices) for q in questions)
    letter_ids = tokenizer.encode_batch([f" {letter}" for letter in LETTERS[:n_max]])
    if any(len(ids) != 1 for ids in letter_ids):
        return None
    letter_ids = [ids[0] for ids in letter_ids]
    cfg = model.cfg
    prompts = [([tokenizer.bos_id] + ids)[-cfg.seq_len:] for ids in tokenizer.encode_batch(
        [mc_prompt(q) for q in questions])]
    out: list[list[float]] = [[] for _ in questions]
    with scoring(model, dtype) as device:
        for start in range(0, len(prompts), batch_size):
            chunk = list(range(start, min(start + batch_size, len(prompts))))
            T = max(len(prompts[i]) for i in chunk)
            x = torch.full((len(chunk), T), tokenizer.pad_id, dtype=torch.long)
            for j, i in enumerate(chunk):
                x[j, :len(prompts[i])] = torch.tensor(prompts[i])
            logits = model(x.to(device), num_recur=num_recur).float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for j, i in enumerate(chunk):
                last = logp[j, len(prompts[i]) - 1]
                out[i] = [float(last[letter_ids[k]]) for k in range(len(questions[i].choices))]
    return out


def score_mc(model: RecurrentLM, tokenizer: Tokenizer, questions: Sequence[MCQuestion], num_recur: int | None,
             mode: str = "loglik", batch_size: int = 32, engine: Engine | None = None, recur: RecurParams | None = None,
             dtype: DtypeChoice | None = None) -> list[dict]:
    """One dict per question: {"correct", "correct_norm", "pred", "pred_norm", "label", "logprobs",
    "mean_depth", "subject"}; see the module docstring for the two modes. Pass `engine` and `recur` (with an exit
    criterion) to score with adaptive depth instead of at `num_recur`."""
    if mode not in MC_MODES:
        raise UserError(f"unknown multiple-choice mode {mode!r} (choices: {', '.join(MC_MODES)})")
    questions = list(questions)
    if not questions:
        return []
    letter = None
    if mode == "letter" and engine is None:
        letter = _letter_logprobs(model, tokenizer, questions, num_recur, batch_size, dtype)
    if letter is not None:
        depth = float(num_recur or model.cfg.mean_recur) if model.cfg.n_shared else 0.0
        per_q = [(lps, [1] * len(lps), depth) for lps in letter]
    else:
        pairs, conts, owner = [], [], []
        for qi, q in enumerate(questions):
            context = mc_prompt(q) if mode == "letter" else mc_context(q)
            for k, choice in enumerate(q.choices):
                cont = f" {LETTERS[k]}" if mode == "letter" else f" {choice}"
                pairs.append((context, cont))
                conts.append(cont)
                owner.append(qi)
        scored = continuation_logprobs(model, tokenizer, pairs, num_recur, batch_size, engine, recur, dtype)
        grouped: list[tuple[list[float], list[int], list[float]]] = [([], [], []) for _ in questions]
        for qi, cont, (lp, d) in zip(owner, conts, scored):
            grouped[qi][0].append(lp)
            grouped[qi][1].append(len(cont) - 1)  # the choice's characters, as lm-eval's acc_norm counts them
            grouped[qi][2].append(d)
        per_q = [(lps, lens, sum(ds) / len(ds)) for lps, lens, ds in grouped]
    results = []
    for q, (lps, lens, depth) in zip(questions, per_q):
        pred, pred_norm = pick_choice(lps, lens)
        results.append({"correct": pred == q.label, "correct_norm": pred_norm == q.label, "pred": pred,
                        "pred_norm": pred_norm, "label": q.label, "logprobs": lps, "mean_depth": depth,
                        "subject": q.subject})
    return results
