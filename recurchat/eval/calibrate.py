"""Calibrated exit thresholds: the most permissive threshold whose bpb loss against fixed r̄ is bounded.

    recurchat calibrate --ckpt runs/tiny --criterion latent --max-bpb-loss 0.01     # then: --exit auto

A CALM-style calibration (Schuster et al. 2022, with Learn-then-Test's fixed-sequence testing): thresholds of one
criterion are tested in order from the strictest (latest exit) to the most permissive on held-out text. Each test
scores the same tokens at fixed r̄ and under the criterion through the KV-cached engine (exactly what generation
spends) and takes the relative bpb loss Σ(nats_exit − nats_r̄) / Σ nats_r̄ with a one-sided 95% upper confidence
bound from paired 32-token segments (delta method for the ratio). A threshold passes when that bound is ≤ the
target; the first failure ends the sequence, which keeps the chance of choosing a threshold whose true loss exceeds
the target at ≤ 5% without a correction for the number of thresholds. The last threshold that passed is chosen and
written beside the weights (`exit_calibration.json`), where `--exit auto` finds it.
Exercised by `pytest tests/eval/test_calibrate.py`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recurchat import checkpoint
from recurchat.data.corpus import prepare_data
from recurchat.data.loader import eval_batches
from recurchat.errors import UserError
from recurchat.eval.evaluate import heldout_source
from recurchat.infer.engine import Engine, RecurParams
from recurchat.model.scoring import scoring

# strictest first: a smaller change between iterations (or a surer gate) is needed before a token may stop
GRIDS = {
    "kl": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "entropy": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "latent": (1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1),
    "cosine": (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "gate": (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01),  # P(safe to stop)
}
# A probe's answer is exact: an exit must wait until the information has reached its position, and before that a
# position's state can already look still, so the latent grid starts far stricter (and needs fp32: bf16 rounding
# alone moves a state by ~1e-3 per iteration).
PROBE_GRIDS = {**GRIDS, "latent": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "cosine": (1e-9, 1e-8, 1e-7,
               1e-6, 1e-5, 1e-4, 1e-3), "gate": (0.9999, 0.9995, 0.999, 0.998, 0.995, *GRIDS["gate"])}
SEGMENT_TOKENS = 32
Z_95 = 1.6448536269514722  # one-sided 95%


def relative_loss(nats_fixed: np.ndarray, nats_exit: np.ndarray) -> tuple[float, float]:
    """(estimate, one-sided 95% upper bound) of Σ(exit − fixed) / Σ fixed over paired segments."""
    total = nats_fixed.sum()
    loss = float((nats_exit - nats_fixed).sum() / total)
    n = nats_fixed.size
    residual = (nats_exit - nats_fixed) - loss * nats_fixed
    se = math.sqrt(n / max(n - 1, 1) * float((residual ** 2).sum())) / float(total)
    return loss, loss + Z_95 * se


def segment_sums(values: torch.Tensor, size: int) -> torch.Tensor:
    """[B, T] → per-segment sums of `size` consecutive positions within each row (the last one may be shorter)."""
    return torch.cat([chunk.sum(dim=1) for chunk in values.split(size, dim=1)]) if values.numel() else values


def score_segments(engine: Engine, tokens: np.ndarray, token_bytes: torch.Tensor, batch_size: int, max_tokens: int,
                   recur: RecurParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(nats, bytes, recursions, tokens) per segment of held-out text under `recur`."""
    token_bytes = token_bytes.to(engine.device)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    with scoring(engine.model, engine.dtype):
        for x, y in eval_batches(tokens, batch_size, engine.cfg.seq_len, max_tokens):
            nll, depth, _ = engine.score(x, y, recur)
            b = token_bytes[y.to(engine.device)]
            counted = (b > 0).double()
            for store, value in zip(parts, (nll.double() * counted, b.double(), depth.double() * counted, counted)):
                store.append(segment_sums(value, SEGMENT_TOKENS).cpu())
    return tuple(torch.cat(p).numpy() for p in parts)  # type: ignore[return-value]


def fixed_sequence(criterion: str, thresholds, test, log) -> tuple[list[dict], dict | None]:
    """Learn-then-Test's fixed-sequence procedure: `test(spec) -> (row with "passed", log line)` for each threshold in
    order, strictest first, until the first failure; (every row tested, the last that passed or None)."""
    tested, chosen = [], None
    for threshold in thresholds:
        spec = f"{criterion}:{threshold:g}"
        row, line = test(spec)
        tested.append(row)
        log(f"{spec:>14}: {line} — {'pass' if row['passed'] else 'fail: stop'}")
        if not row["passed"]:
            break
        chosen = row
    return tested, chosen


def check_request(criterion: str, max_loss: float, flag: str = "--max-bpb-loss") -> None:
    if criterion not in GRIDS:
        raise UserError(f"cannot calibrate {criterion!r} (choose from {', '.join(GRIDS)})")
    if not 0 < max_loss < 1:
        raise UserError(f"{flag} must be a fraction in (0, 1), e.g. 0.01 for 1%, got {max_loss}")


def calibrate(engine: Engine, tokens: np.ndarray, token_bytes: torch.Tensor, criterion: str, max_bpb_loss: float,
              batch_size: int = 16, max_tokens: int = 8192, max_recur: int | None = None, log=print) -> dict:
    """Test GRIDS[criterion] from strictest to most permissive; return the choice and every test (JSON-ready)."""
    check_request(criterion, max_bpb_loss)
    cfg = engine.cfg
    if not cfg.recursive:
        raise UserError("a standard model (no shared blocks) has no depth to calibrate")
    cap = max_recur or cfg.r_max
    fixed = score_segments(engine, tokens, token_bytes, batch_size, max_tokens, RecurParams(num_recur=cfg.mean_recur))
    bpb_fixed = float(fixed[0].sum() / (math.log(2) * fixed[1].sum()))
    log(f"fixed r̄ = {cfg.mean_recur}: bpb {bpb_fixed:.4f} on {int(fixed[3].sum())} tokens")
    def test(spec: str) -> tuple[dict, str]:
        nats, _, depth, _ = score_segments(engine, tokens, token_bytes, batch_size, max_tokens,
                                           RecurParams(exit=spec, max_recur=cap))
        loss, upper = relative_loss(fixed[0], nats)
        row = {"exit": spec, "bpb": float(nats.sum() / (math.log(2) * fixed[1].sum())), "bpb_loss": loss,
               "bpb_loss_upper_95": upper, "mean_recursions": float(depth.sum() / fixed[3].sum()),
               "passed": upper <= max_bpb_loss}
        return row, (f"bpb {row['bpb']:.4f}, loss {100 * loss:+.2f}% (95% bound {100 * upper:+.2f}%), "
                     f"{row['mean_recursions']:.2f} recursions/token")

    tested, chosen = fixed_sequence(criterion, GRIDS[criterion], test, log)
    result = {"criterion": criterion, "max_bpb_loss": max_bpb_loss, "max_recur": cap, "bpb_fixed": bpb_fixed,
              "fixed_recursions": cfg.mean_recur, "tokens": int(fixed[3].sum()), "segments": int(fixed[0].size),
              "segment_tokens": SEGMENT_TOKENS, "tested": tested}
    if chosen is None:
        raise UserError(f"no {criterion} threshold keeps the bpb loss within {100 * max_bpb_loss:g}% at 95% "
                        f"confidence (strictest tested: {tested[0]['exit']}, bound "
                        f"{100 * tested[0]['bpb_loss_upper_95']:+.2f}%); try another criterion or a larger loss")
    result.update({k: chosen[k] for k in ("exit", "bpb", "bpb_loss", "bpb_loss_upper_95", "mean_recursions")})
    return result


def calibrate_checkpoint(ckpt: str, criterion: str, max_bpb_loss: float, eval_tokens: int = 8192,
                         batch_size: int = 16, data: str | None = None, dtype: str = "auto",
                         device: str = "auto") -> dict:
    """`recurchat calibrate`: calibrate on the checkpoint's held-out text and save the choice beside its weights."""
    import sys

    check_request(criterion, max_bpb_loss)  # before minutes of loading and scoring
    loaded, model = checkpoint.load_model(ckpt, device)
    engine = Engine.for_checkpoint(loaded, model, dtype)
    print(engine.describe(), file=sys.stderr)
    val = prepare_data(heldout_source(loaded, data), loaded.model_cfg.vocab_size, tokenizer=loaded.tokenizer,
                       log=lambda *a, **k: print(*a, file=sys.stderr, **k)).val
    result = calibrate(engine, val, loaded.tokenizer.token_bytes(), criterion, max_bpb_loss, batch_size,
                       eval_tokens, log=lambda line: print(line, file=sys.stderr))
    path = checkpoint.save_calibration(ckpt, {**result, "dtype": engine.dtype.name})
    print(f"chosen: {result['exit']} — bpb loss {100 * result['bpb_loss']:+.2f}% (95% upper bound "
          f"{100 * result['bpb_loss_upper_95']:+.2f}%, target {100 * max_bpb_loss:g}%), "
          f"{result['mean_recursions']:.2f} recursions/token vs {result['fixed_recursions']} fixed; saved to {path}; "
          "use it with --exit auto")
    return result


def accuracy_loss(correct_ref: np.ndarray, correct_exit: np.ndarray) -> tuple[float, float]:
    """(estimate, one-sided 95% upper bound) of the accuracy lost, mean(ref − exit), over paired labels."""
    diff = correct_ref.astype(np.float64) - correct_exit.astype(np.float64)
    n = diff.size
    se = float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return float(diff.mean()), float(diff.mean()) + Z_95 * se


def calibrate_probe(engine: Engine, batch, criterion: str, max_acc_loss: float, reference_recur: int,
                    max_recur: int, log=print) -> dict:
    """The probe analogue of `calibrate`: thresholds strictest first, each scored teacher-forced on the same held-out
    sequences, passing while the one-sided 95% bound on the accuracy lost against fixed `reference_recur` stays
    ≤ `max_acc_loss`; the first failure ends the sequence. Returns the choice with every test and its recursions
    by difficulty."""
    from recurchat.eval import probes

    check_request(criterion, max_acc_loss, "--max-acc-loss")
    if not engine.cfg.recursive:
        raise UserError("a standard model (no shared blocks) has no depth to calibrate")
    ref = probes.score_exit(engine, batch, RecurParams(num_recur=reference_recur).validate(engine.cfg))
    ref_ok = np.array([r["correct"] for r in ref])
    log(f"fixed r = {reference_recur}: accuracy {ref_ok.mean():.4f} on {ref_ok.size} labels")
    def test(spec: str) -> tuple[dict, str]:
        out = probes.score_exit(engine, batch, RecurParams(exit=spec, max_recur=max_recur).validate(engine.cfg))
        ok = np.array([r["correct"] for r in out])
        loss, upper = accuracy_loss(ref_ok, ok)
        row = {"exit": spec, "acc": float(ok.mean()), "acc_loss": loss, "acc_loss_upper_95": upper,
               "mean_recursions": float(np.mean([r["mean_depth"] for r in out])),
               "recursions_by_difficulty": probes.mean_by_difficulty(out, "mean_depth"),
               "passed": upper <= max_acc_loss}
        return row, (f"accuracy {row['acc']:.4f}, loss {100 * loss:+.2f} points (95% bound {100 * upper:+.2f}), "
                     f"{row['mean_recursions']:.2f} recursions/label")

    tested, chosen = fixed_sequence(criterion, PROBE_GRIDS[criterion], test, log)
    if chosen is None:
        raise UserError(f"no {criterion} threshold keeps the accuracy loss within {100 * max_acc_loss:g} points at "
                        f"95% confidence (strictest tested: {tested[0]['exit']}); try another criterion")
    return {"criterion": criterion, "max_acc_loss": max_acc_loss, "max_recur": max_recur,
            "reference_recursions": reference_recur, "acc_reference": float(ref_ok.mean()), "labels": int(ref_ok.size),
            "tested": tested, **{k: chosen[k] for k in ("exit", "acc", "acc_loss", "acc_loss_upper_95",
                                                         "mean_recursions", "recursions_by_difficulty")}}


def calibrate_probe_checkpoint(ckpt: str, probe: str, criterion: str, max_acc_loss: float, limit: int = 256,
                               reference_recur: int | None = None, max_recur: int | None = None,
                               dtype: str = "auto", device: str = "auto") -> dict:
    """`recurchat calibrate --probe probe:NAME:LO-HI`: calibrate on held-out probe sequences (a seed range the eval
    does not use) against fixed r = 4r̄ by default, and save the choice beside the weights for `--exit auto`."""
    import sys

    from recurchat.data.tasks.probes import parse_probe
    from recurchat.eval import probes

    check_request(criterion, max_acc_loss, "--max-acc-loss")
    spec = parse_probe(probe)
    loaded, model = checkpoint.load_model(ckpt, device)
    probes.check_vocabulary(spec, loaded.tokenizer, model)
    engine = Engine.for_checkpoint(loaded, model, dtype)
    print(engine.describe(), file=sys.stderr)
    cfg = loaded.model_cfg
    reference = reference_recur or 4 * cfg.mean_recur
    result = calibrate_probe(engine, probes.eval_batch(spec, limit, seed=probes.CALIBRATION_SEED), criterion,
                             max_acc_loss, reference, max_recur or max(cfg.r_max, reference),
                             log=lambda line: print(line, file=sys.stderr))
    path = checkpoint.save_calibration(ckpt, {**result, "probe": spec.name, "dtype": engine.dtype.name})
    print(f"chosen: {result['exit']} — accuracy loss {100 * result['acc_loss']:+.2f} points (95% bound "
          f"{100 * result['acc_loss_upper_95']:+.2f}, target {100 * max_acc_loss:g}), {result['mean_recursions']:.2f} "
          f"recursions/label vs {reference} fixed; saved to {path}; use it with --exit auto")
    return result
