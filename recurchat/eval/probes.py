"""Scoring labelled-sequence probes by difficulty × r, under exit criteria, and the state trajectory per difficulty.

    recurchat eval --ckpt runs/parity --tasks probe:parity:1-16 --recur 1,2,4,8,16,32 --exit latent:0.01

A label is correct when the head's argmax at its position is the label token. At a fixed r every position runs r
iterations (the training forward); under an exit criterion the sequences are scored teacher-forced through
`Engine.score`, so every position stops at its own depth exactly as in generation. The trajectory runs the
uncached forward to the deepest r and reports, per difficulty, the relative state change ‖s_i − s_{i−1}‖/‖s_i‖ at
every iteration and the mean iteration from which the answer no longer changes ("settle"), so a model that
converges later on harder instances — or one that contracts by r = 2 — is visible at a glance.
Exercised by `pytest tests/eval/test_eval_probes.py`.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from recurchat.data.tasks.probes import EVAL_SEED, ProbeBatch, ProbeSpec, same_vocabulary
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurParams
from recurchat.model.exit_gate import settled
from recurchat.model.hardware import DtypeChoice
from recurchat.model.recurrent import RecurrentLM
from recurchat.model.scoring import scoring


CALIBRATION_SEED = 1 << 20  # calibration sequences: eval seeds from here on, never those `recurchat eval` uses


def mean_by_difficulty(records: list[dict], key: str) -> dict[str, float]:
    """{difficulty: mean of records[key]} over label records."""
    groups: dict[int, list[float]] = defaultdict(list)
    for r in records:
        groups[r["difficulty"]].append(float(r[key]))
    return {str(d): sum(v) / len(v) for d, v in sorted(groups.items())}


def eval_batch(spec: ProbeSpec, n: int, seed: int = 0) -> ProbeBatch:
    """`n` held-out sequences: seeded from EVAL_SEED on, a seed space training never draws from."""
    return spec.batch(n, EVAL_SEED + seed)


def check_vocabulary(spec: ProbeSpec, tokenizer: Tokenizer, model: RecurrentLM) -> None:
    """UserError unless the checkpoint was trained on this probe's vocabulary and can hold its sequences."""
    if not same_vocabulary(spec, tokenizer):
        raise UserError(f"{spec.name}: this checkpoint's tokenizer is not the probe's vocabulary "
                        f"(train one with recurchat train --preset probe --data {spec.name})")
    if spec.width > model.cfg.seq_len:
        raise UserError(f"{spec.name}: sequences of {spec.width} tokens exceed the model's seq_len "
                        f"{model.cfg.seq_len}")


def labels(batch: ProbeBatch, correct: torch.Tensor, depth: torch.Tensor | None = None) -> list[dict]:
    """One record per label — difficulty, correct, depth — in the shape the eval sweep groups by difficulty."""
    mask = batch.y >= 0
    d = batch.difficulty[mask].tolist()
    ok = correct.cpu()[mask].tolist()
    depths = depth.cpu()[mask].tolist() if depth is not None else [0] * len(d)
    return [{"difficulty": a, "correct": bool(b), "mean_depth": float(c)} for a, b, c in zip(d, ok, depths)]


def score_fixed(model: RecurrentLM, batch: ProbeBatch, r: int, dtype: DtypeChoice | None,
                batch_size: int = 64) -> list[dict]:
    """Label records with every position at r iterations."""
    out = []
    with scoring(model, dtype) as device:
        for part in batch.chunks(batch_size):
            top = model(part.x.to(device), num_recur=r).argmax(dim=-1).cpu()
            depth = torch.full_like(top, r if model.recur else 0)
            out += labels(part, top == part.y, depth)
    return out


def score_exit(engine: Engine, batch: ProbeBatch, recur: RecurParams, batch_size: int = 64) -> list[dict]:
    """Label records with every position stopping by the exit criterion (teacher-forced, KV-cached)."""
    out = []
    with scoring(engine.model, engine.dtype):
        for part in batch.chunks(batch_size):
            _, depth, top = engine.score(part.x, part.y.clamp_min(0), recur)
            out += labels(part, top.cpu() == part.y, depth)
    return out


def probe_accuracy(model: RecurrentLM, spec: ProbeSpec, r: int, n: int, dtype: DtypeChoice | None) -> float:
    """Accuracy over every label of `n` held-out sequences at r (the trainer's validation figure)."""
    records = score_fixed(model, eval_batch(spec, n), r, dtype)
    return sum(rec["correct"] for rec in records) / max(1, len(records))


def settle_iteration(tops: torch.Tensor) -> torch.Tensor:
    """tops [depth, ...] (the answer after iterations 1..depth) → the first iteration from which it never changes."""
    return len(tops) - settled(tops).sum(0) + 1  # the final answer holds from here (iteration 1 if it never changed)


def trajectory(model: RecurrentLM, batch: ProbeBatch, depth: int, dtype: DtypeChoice | None) -> dict:
    """{"rel_change": {difficulty: [‖s_i − s_{i−1}‖/‖s_i‖ for i = 1..depth]}, "settle": {difficulty: mean
    iteration after which the answer stays the same}, "depth": depth}; means over the labels of each difficulty."""
    mask = batch.y >= 0
    with scoring(model, dtype) as device:
        states, cos, sin = model.unroll(batch.x.to(device), depth)
        changes, tops = [], []
        for prev, s in zip(states, states[1:]):
            s32 = s.float()
            changes.append(((s32 - prev.float()).norm(dim=-1) / s32.norm(dim=-1).clamp_min(1e-12)).cpu()[mask])
            tops.append(model.tail_logits(s, cos, sin).argmax(dim=-1).cpu()[mask])
    settle = settle_iteration(torch.stack(tops))
    change = torch.stack(changes)  # [depth, labels]
    by_level: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(batch.difficulty[mask].tolist()):
        by_level[d].append(i)
    out: dict = {"rel_change": {}, "settle": {}, "depth": depth}
    for d, idx in sorted(by_level.items()):
        index = torch.tensor(idx)
        out["rel_change"][str(d)] = [round(v, 5) for v in change[:, index].mean(dim=1).tolist()]
        out["settle"][str(d)] = round(settle[index].float().mean().item(), 3)
    return out
