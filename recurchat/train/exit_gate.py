"""Train the learned exit gate (model/exit_gate.py) on a frozen checkpoint, then store it beside the weights.

    recurchat exit-train --ckpt runs/tiny [--tau 0.01] [--deep-recur 16]
    recurchat exit-train --ckpt runs/parity --probe probe:parity:1-16 --deep-recur 24   # a probe's labels
    recurchat exit-train --ckpt runs/parity --probe probe:parity:1-16 --deep-recur 24 --label answer
    recurchat calibrate --ckpt runs/tiny --criterion gate --max-bpb-loss 0.01     # then --exit auto

Labels come from the model itself: a token at iteration i is "safe to stop" when KL(p_deep ‖ p_i) ≤ τ nats, where
p_deep is its next-token distribution after `deep_recur` iterations (default r_max), or with `--label answer` when its
argmax after iteration i is the one it keeps to the deepest iteration — the label an accuracy budget needs: a settled
answer's confidence keeps sharpening for several iterations, which a tight τ waits for. Every training token gives one
example per iteration 1..deep_recur (model/exit_gate.trajectory runs the uncached forward once to that depth and the
coda and head after every iteration). The gate is fitted with AdamW on binary cross-entropy over text from the
checkpoint's training split and judged on its held-out split: accuracy, AUC and the safe rate per iteration are
printed and stored with the gate. Choosing the probability at which a token stops is calibration's job
(eval/calibrate.py), which measures the bpb it costs through the KV-cached engine.
Exercised by `pytest tests/infer/test_gate.py`.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from recurchat import checkpoint
from recurchat.data.corpus import prepare_data
from recurchat.data.loader import eval_batches
from recurchat.data.tasks.probes import parse_probe
from recurchat.errors import UserError
from recurchat.eval.evaluate import heldout_source
from recurchat.eval.probes import CALIBRATION_SEED, check_vocabulary, eval_batch
from recurchat.model.exit_gate import ExitGate, settled, trajectory
from recurchat.model.hardware import choose_dtype
from recurchat.model.recurrent import RecurrentLM
from recurchat.model.scoring import scoring


def gate_examples(model: RecurrentLM, tokens: np.ndarray, max_tokens: int, deep: int, dtype,
                  batch_size: int = 8) -> tuple[torch.Tensor, ...]:
    """(state [N, d], prev_state [N, d], step [N], kl [N], settled [N]) for every (token, iteration ≤ deep) of up to
    `max_tokens` tokens of `tokens`, read as consecutive sequences of the model's context length (eval_batches)."""
    T = model.cfg.seq_len
    if len(tokens) < T + 1:
        raise UserError(f"exit-train needs at least {T + 1} tokens of text, got {len(tokens)}")
    return examples_of(model, ((x, None) for x, _ in eval_batches(tokens, batch_size, T, max_tokens)), deep, dtype)


def probe_examples(model: RecurrentLM, batch, deep: int, dtype,
                   batch_size: int = 32) -> tuple[torch.Tensor, ...]:
    """The same examples for the labelled positions of a probe batch (data/tasks/probes.py) only."""
    return examples_of(model, ((part.x, part.y >= 0) for part in batch.chunks(batch_size)), deep, dtype)


def examples_of(model: RecurrentLM, parts, deep: int, dtype) -> tuple[torch.Tensor, ...]:
    """Gate examples from (x [B, T], positions to keep [B, T] or None for all) pairs."""
    out: list[list[torch.Tensor]] = [[], [], [], [], []]
    with scoring(model, dtype) as device:
        for x, keep in parts:
            states, kl, tops = trajectory(model, x.to(device), deep)
            steps = torch.arange(1, deep + 1, device=device).view(deep, 1, 1).expand_as(kl)
            for store, value in zip(out, (states[1:], states[:-1], steps, kl, settled(tops))):
                value = value.cpu()
                store.append(value[:, keep] if keep is not None else value.reshape(deep, -1, *value.shape[3:]))
    return tuple(torch.cat([part.reshape(-1, *part.shape[2:]) for part in field]) for field in out)


def fit_gate(gate: ExitGate, examples, safe: torch.Tensor, steps: int, batch: int = 4096, lr: float = 3e-3,
             seed: int = 0) -> float:
    """AdamW on BCE(gate logit, safe) over random minibatches; returns the last 10% of steps' mean loss."""
    state, prev, step = examples[:3]
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    gate.train()
    for it in range(steps):
        pick = torch.randint(len(safe), (min(batch, len(safe)),), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / steps))
        loss = F.binary_cross_entropy_with_logits(gate(state[pick], prev[pick], step[pick]), safe[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gate.eval()
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count half)."""
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    mean_rank = (torch.cumsum(counts, 0) - counts).double() + (counts.double() + 1) / 2  # ties share their ranks
    ranks = mean_rank[inverse]
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def safe_labels(examples, label: str, tau: float) -> torch.Tensor:
    """bool [N]: which examples are safe to stop at, by `label` ("kl": KL ≤ tau nats; "answer": it settled)."""
    return examples[3] <= tau if label == "kl" else examples[4]


@torch.no_grad()
def judge(gate: ExitGate, examples, safe: torch.Tensor) -> dict:
    """Held-out figures against the labels `safe`: accuracy at p = 0.5, AUC, and per iteration the safe rate, the
    gate's mean probability and its AUC (NaN where every token is safe, or none is)."""
    state, prev, step = examples[:3]
    prob = torch.cat([torch.sigmoid(gate(*(t[i:i + 65536] for t in (state, prev, step))))
                      for i in range(0, len(step), 65536)])
    per_iteration = {str(i): {"safe_rate": float(safe[at].float().mean()), "mean_prob": float(prob[at].mean()),
                              "auc": auc(prob[at], safe[at])} for i in step.unique().tolist() for at in [step == i]}
    return {"accuracy": float(((prob >= 0.5) == safe).float().mean()), "auc": auc(prob, safe),
            "safe_rate": float(safe.float().mean()), "by_iteration": per_iteration}


def collect(loaded, model: RecurrentLM, deep: int, precision, data: str | None, probe: str | None,
            train_tokens: int, eval_tokens: int) -> tuple[tuple, tuple]:
    """(training, held-out) examples: from text, or with `probe` from its labelled positions (sequences seeded apart
    from the evaluation's and the calibration's; `*_tokens` then count sequences)."""
    if probe is not None:
        spec = parse_probe(probe)
        check_vocabulary(spec, loaded.tokenizer, model)
        return (probe_examples(model, eval_batch(spec, train_tokens, seed=2 * CALIBRATION_SEED), deep, precision),
                probe_examples(model, eval_batch(spec, eval_tokens, seed=3 * CALIBRATION_SEED), deep, precision))
    text = prepare_data(heldout_source(loaded, data), model.cfg.vocab_size, tokenizer=loaded.tokenizer,
                        log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    return (gate_examples(model, text.train, train_tokens, deep, precision),
            gate_examples(model, text.val, eval_tokens, deep, precision))


GATE_LABELS = ("kl", "answer")  # what makes stopping at iteration i safe (safe_labels)
PROBE_SEQUENCES = (512, 128)  # a probe's default (training, held-out) sequences: ~16 labels each


def train_exit_gate(ckpt: str, tau: float = 0.01, deep_recur: int | None = None, train_tokens: int | None = None,
                    eval_tokens: int | None = None, steps: int = 400, hidden: int = 64, data: str | None = None,
                    dtype: str = "auto", device: str = "auto", seed: int = 0, probe: str | None = None,
                    label: str = "kl") -> dict:
    """`recurchat exit-train`: collect, fit, judge, save (exit_gate.safetensors beside the weights). With `probe`
    (probe:NAME:LO-HI) the examples are that probe's labelled positions; `label` is "kl" (KL ≤ tau) or "answer"."""
    def log(line: str) -> None:
        print(line, file=sys.stderr)

    if label not in GATE_LABELS:
        raise UserError(f"--label must be one of {', '.join(GATE_LABELS)}, got {label!r}")
    if tau <= 0:
        raise UserError(f"--tau must be > 0 nats, got {tau}")
    loaded, model = checkpoint.load_model(ckpt, device)
    cfg = model.cfg
    if not cfg.recursive:
        raise UserError("a standard model (no shared blocks) has no depth to gate")
    deep = deep_recur or cfg.r_max
    if deep < 2:
        raise UserError(f"--deep-recur must be >= 2, got {deep}")
    precision = choose_dtype(dtype, next(model.parameters()).device)
    defaults = PROBE_SEQUENCES if probe else (8192, 4096)
    train_tokens, eval_tokens = train_tokens or defaults[0], eval_tokens or defaults[1]
    train, held = collect(loaded, model, deep, precision, data, probe, train_tokens, eval_tokens)
    unit = "labels" if probe else "tokens"
    log(f"{len(train[2])} training examples ({len(train[2]) // deep} {unit} × {deep} iterations), "
        f"{len(held[2])} held out; " + (f"τ = {tau:g} nats" if label == "kl" else "safe once the answer settles"))
    torch.manual_seed(seed)
    gate = ExitGate(cfg.d_model, deep, hidden)
    train_loss = fit_gate(gate, train, safe_labels(train, label, tau).float(), steps, seed=seed)
    figures = judge(gate, held, safe_labels(held, label, tau))
    for i, row in figures["by_iteration"].items():
        log(f"  iteration {i:>2}: safe {100 * row['safe_rate']:5.1f}% of held-out tokens, gate says "
            f"{100 * row['mean_prob']:5.1f}% on average, AUC {row['auc']:.3f}")
    info = {"label": label, **({"tau": tau} if label == "kl" else {}), "deep_recur": deep,
            "train_tokens": len(train[2]) // deep, "eval_tokens": len(held[2]) // deep,
            **({"probe": probe} if probe else {}),
            "steps": steps, "train_loss": train_loss, "dtype": precision.name, **figures}
    path = checkpoint.save_exit_gate(loaded.path, gate, info)
    budget = f"--probe {probe} --max-acc-loss 0.01" if probe else "--max-bpb-loss 0.01"
    print(f"exit gate: held-out accuracy {100 * figures['accuracy']:.1f}% (safe rate "
          f"{100 * figures['safe_rate']:.1f}%), AUC {figures['auc']:.3f}; saved to {path}; calibrate it with "
          f"`recurchat calibrate --ckpt {ckpt} --criterion gate {budget}`")
    return info
