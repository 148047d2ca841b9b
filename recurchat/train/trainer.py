"""The training loop shared by pretraining and SFT: accumulation, LR schedule, depth sampling, eval, checkpoints.

Each micro-step draws its recursion depth r from the DepthSampler (seeded by (seed, step), so ranks agree and a
resumed run repeats), runs truncated BPTT with k = bptt_k, and logs r, loss, lr, tokens/s, FLOPs/token for that r
and MFU (model/flops.py — the same accounting `recurchat bench` uses).

Under torchrun every rank runs this same loop on its shard of each global batch (train/distributed.py wraps the
model in DDP or FSDP2): accumulation shrinks with the world size so a step still sees total_batch_tokens, the
loss is averaged over ranks before logging, every step checks that all ranks drew the same depths and records
them in out/ranks/rank{N}.jsonl, and rank 0 alone writes metrics and checkpoints.

    recurchat train --preset cpu-tiny --out runs/tiny --max-steps 200
    torchrun --standalone --nproc_per_node=2 -m recurchat train --preset cpu-tiny --batch-size 4 --out runs/tiny2 \
        [--parallel fsdp]
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import TextIO

import torch

from recurchat import checkpoint
from recurchat.data.corpus import PreparedData, prepare_data
from recurchat.data.loader import ProbeLoader, RowLoader, TokenLoader
from recurchat.data.sft import SFTData, build_sft_data
from recurchat.data.tasks.probes import ProbeSpec, is_probe, parse_probe, within_reach
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.eval.bpb import evaluate_bpb, evaluate_rows_bpb
from recurchat.model import hardware
from recurchat.model.depth import DepthSampler
from recurchat.model.flops import flops_per_token, mfu
from recurchat.model.recurrent import RecurrentLM
from recurchat.train import distributed, probes
from recurchat.train.optim import build_optimizers, lr_multiplier, set_lr
from recurchat.train.probes import check_probe
from recurchat.train.recipes import micro_loss
from recurchat.train.spec import RunSpec, eval_depths, fit_batch_to_world, resumable_loader_state, resume_spec
from recurchat.train.telemetry import StepMetrics, Telemetry, truncate_log


class Diverged(RuntimeError):
    """The loss became NaN or infinite: a property of the settings (too high a learning rate), not a bug."""


@dataclass
class Run:
    """A training run in progress: built once by `setup`, advanced by `train_step`."""

    spec: RunSpec
    dist: distributed.DistInfo
    tokenizer: Tokenizer
    data: PreparedData | None  # the token streams (SFT: its base's pretraining text, None if that is gone)
    sft: SFTData | None  # SFT: the conversation rows
    probe: ProbeSpec | None  # a labelled-sequence probe run (--data probe:NAME:LO-HI): its batches are generated
    net: RecurrentLM  # the bare model: eval, parameter counts, compile
    model: torch.nn.Module  # what trains: net, or its DDP / FSDP2 wrapping
    dtype: hardware.DtypeChoice
    peak: hardware.Peak
    optimizers: list[torch.optim.Optimizer]
    sampler: DepthSampler
    loader: TokenLoader | RowLoader | ProbeLoader
    text_loader: TokenLoader | None  # SFT with mix_pretrain: windows of pretraining text
    grad_accum: int
    start_step: int
    end_step: int
    telemetry: Telemetry
    rank_log: TextIO | None  # under torchrun: this rank's depths and local loss, one line per step
    eval_depths: list[int]  # r at which held-out bpb is measured


def load_data(spec: RunSpec, dist: distributed.DistInfo, log) -> tuple[Tokenizer, PreparedData | None, SFTData | None]:
    """(tokenizer, token streams, SFT rows): rank 0 trains the tokenizer and writes the token cache first, so
    the other ranks only read them. SFT also loads the pretraining text (`pretrain_data`): its held-out split is
    where SFT reports plain-text bpb, the check that fine-tuning kept the language model."""
    if is_probe(spec.train.data):
        return check_probe(parse_probe(spec.train.data), spec.model, spec.train, spec.tokenizer), None, None
    if spec.train.hint_weight > 0:
        raise UserError("--hint-weight needs probe data with intermediate targets (e.g. --data probe:chase:1-2)")
    with distributed.main_first(dist):
        if spec.is_sft:
            sft = build_sft_data(spec.train.data, spec.tokenizer, spec.model.seq_len, spec.train.sft_examples,
                                 spec.train.seed)
            log(f"sft data {sft.description}")
            return spec.tokenizer, pretraining_text(spec, log), sft
        data = prepare_data(spec.train.data or None, spec.model.vocab_size, tokenizer=spec.tokenizer, log=log)
    if data.tokenizer.vocab_size > spec.model.vocab_size:
        raise UserError(f"tokenizer has {data.tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{spec.model.vocab_size}")
    return data.tokenizer, data, None


def pretraining_text(spec: RunSpec, log) -> PreparedData | None:
    """SFT's view of its base's pretraining text; None (plain-text bpb skipped, with a note) when that text is gone
    and nothing needs it to train."""
    try:
        return prepare_data(spec.train.pretrain_data or None, None, tokenizer=spec.tokenizer, log=log)
    except UserError as e:
        if spec.train.mix_pretrain > 0:
            raise UserError(f"--mix-pretrain needs the base's pretraining text: {e}") from None
        log(f"note: no plain-text val bpb during SFT ({e}); pass --pretrain-data to name the text")
        return None


def accumulation_steps(spec: RunSpec, dist: distributed.DistInfo) -> int:
    """Micro-steps per optimizer step so that one step sees `total_batch_tokens` over all ranks."""
    per_micro = spec.train.batch_size * spec.model.seq_len * dist.world_size
    rows_per_step = spec.train.total_batch_tokens / per_micro
    if rows_per_step < 1 or rows_per_step != int(rows_per_step):
        raise UserError(f"total_batch_tokens={spec.train.total_batch_tokens} is not a multiple of batch_size × "
                        f"seq_len × world_size = {per_micro}"
                        + (f"; with {dist.world_size} ranks, lower --batch-size"
                           if dist.distributed and rows_per_step < 1 else ""))
    return int(rows_per_step)


def build_model(spec: RunSpec, dist: distributed.DistInfo, log) -> tuple[RecurrentLM, torch.nn.Module]:
    """The bare model with its starting weights, and its wrapping for this world (DDP / FSDP2 / itself).

    Weights go in before wrapping: FSDP2 shards whatever the module holds."""
    net = RecurrentLM(spec.model).to(dist.device)
    if spec.base is not None and spec.resume is None:
        checkpoint.load_model_weights(net, spec.base)
        log(f"initialised from {spec.base.path}")
    if spec.resume is not None:
        checkpoint.load_model_weights(net, spec.resume)
    return net, distributed.wrap(net, dist, spec.train.parallel)


def open_logs(spec: RunSpec, dist: distributed.DistInfo, start_step: int,
              progress: bool) -> tuple[Telemetry, TextIO | None]:
    """metrics.jsonl (+ wandb, progress bar) on rank 0; under torchrun, every rank's own depth log."""
    fresh = spec.resume is None
    if fresh and dist.is_main:
        (spec.out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run (--overwrite) starts a fresh log
    elif dist.is_main:
        truncate_log(spec.out / "metrics.jsonl", start_step)  # steps logged after the checkpoint are run again
    rank_log = None
    if dist.distributed:
        rank_path = spec.out / "ranks" / f"rank{dist.rank}.jsonl"
        rank_path.parent.mkdir(parents=True, exist_ok=True)
        if not fresh:
            truncate_log(rank_path, start_step)
        rank_log = open(rank_path, "w" if fresh else "a", encoding="utf-8")
    telemetry = Telemetry(spec.out, spec.train.max_steps, start_step, enabled=dist.is_main,
                          wandb_project=spec.train.wandb, progress=progress,
                          config={"model": dataclasses.asdict(spec.model), "train": dataclasses.asdict(spec.train)})
    return telemetry, rank_log


def build_loaders(spec: RunSpec, dist: distributed.DistInfo, data: PreparedData | None, sft: SFTData | None,
                  probe: ProbeSpec | None) -> tuple[TokenLoader | RowLoader | ProbeLoader, TokenLoader | None]:
    """What steps train on: token windows (pretraining), conversation rows (SFT) or generated probe sequences; an
    SFT run with mix_pretrain > 0 also gets windows of its base's pretraining text."""
    t, m = spec.train, spec.model
    if probe is not None:
        return ProbeLoader(probe, t.batch_size, seed=t.seed, rank=dist.rank, world_size=dist.world_size,
                           hints=t.hint_weight > 0), None

    def windows() -> TokenLoader:
        return TokenLoader(data.train, t.batch_size, m.seq_len, seed=t.seed, rank=dist.rank,
                           world_size=dist.world_size)

    if sft is None:
        return windows(), None
    rows = RowLoader(sft.train_x, sft.train_y, t.batch_size, seed=t.seed, rank=dist.rank, world_size=dist.world_size)
    return rows, (windows() if t.mix_pretrain > 0 else None)


def text_microsteps(run: Run, step: int) -> list[bool]:
    """Which micro-steps of `step` train on pretraining text (each with probability mix_pretrain); seeded by
    (seed, step), so every rank and every resumed run makes the same choice."""
    if run.text_loader is None:
        return [False] * run.grad_accum
    g = torch.Generator().manual_seed((run.spec.train.seed * 1_000_003 + step + 0x5EED) % (2**63))
    return (torch.rand(run.grad_accum, generator=g) < run.spec.train.mix_pretrain).tolist()


def setup(spec: RunSpec, progress: bool = True) -> Run:
    """Everything before the first step: process group, data, model, dtype, optimizers, resume state, logs."""
    dist = distributed.init()
    torch.manual_seed(spec.train.seed)
    log = print if dist.is_main else (lambda *a, **k: None)
    spec, fitted = fit_batch_to_world(spec, dist.world_size)
    if fitted:
        log(fitted)
    tokenizer, data, sft = load_data(spec, dist, log)
    grad_accum = accumulation_steps(spec, dist)
    if dist.distributed and spec.train.progressive_loss > 0:
        raise UserError("--progressive-loss runs two forwards per micro-step, which DDP/FSDP2 gradient hooks do not "
                        "allow; train it on one process")
    net, model = build_model(spec, dist, log)
    # bf16 only where the device runs it natively (model/hardware.py); Muon orthogonalises in the same dtype.
    dtype = hardware.choose_dtype(spec.train.dtype, dist.device)
    optimizers = build_optimizers(net, spec.train, dtype.torch_dtype)  # names without DDP's "module." prefix
    t, m = spec.train, spec.model
    sampler = DepthSampler(t.recur_dist, m.mean_recur, m.r_max, t.recur_sigma, t.seed,
                           int(t.curriculum_frac * t.max_steps))
    probe = parse_probe(t.data) if is_probe(t.data) else None
    loader, text_loader = build_loaders(spec, dist, data, sft, probe)
    start_step = 0
    if spec.resume is not None:
        state = checkpoint.load_train_state(
            spec.resume, optimizers, lambda opts, states: distributed.load_optimizer_states(model, opts, states))
        loader.load_state_dict(resumable_loader_state(state, loader.global_rows, grad_accum))
        if text_loader is not None and "text_loader" in state:
            text_loader.load_state_dict(state["text_loader"])
        start_step = int(state["step"])
        log(f"resumed from {spec.resume.path} at step {start_step}")
    if t.compile if t.compile is not None else dist.device.type == "cuda":
        net.compile_stages()
    peak = hardware.resolve_peak(dist.device, dtype, m, t.batch_size * m.seq_len, t.peak_flops)
    end_step = min(t.max_steps, start_step + t.stop_after) if t.stop_after > 0 else t.max_steps
    telemetry, rank_log = open_logs(spec, dist, start_step, progress)
    run = Run(spec, dist, tokenizer, data, sft, probe, net, model, dtype, peak, optimizers, sampler, loader,
              text_loader, grad_accum, start_step, end_step, telemetry, rank_log, eval_depths(m, t))
    log(describe(run))
    telemetry.log({"step": start_step, "run": hardware.run_record(dist.device, dtype, peak)})
    return run


def describe(run: Run) -> str:
    m, t, dist = run.spec.model, run.spec.train, run.dist
    return (f"model: {run.net.num_params()['total']:,} parameters ({'recursive' if m.recursive else 'standard'}, "
            f"P/R/C = {m.n_prelude}/{m.n_shared}/{m.n_coda}, r̄ = {m.mean_recur}); "
            f"{run.grad_accum} micro-steps of {t.batch_size}×{m.seq_len} per step"
            + (f" on each of {dist.world_size} ranks ({t.parallel})" if dist.distributed else "")
            + f"; {hardware.banner(dist.device, run.dtype, run.peak)}")


def batch_for(run: Run, r: int, on_text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The next micro-batch (x, y, hints) on the device; a recursive model's probe labels beyond what r iterations
    can reach are masked when loss_reach >= 0 (difficulty > r + loss_reach). A standard model has no iterations to
    reach with (it runs r = 1): every label counts. hints: the probe's intermediate targets when hint_weight > 0,
    else None."""
    batch = (run.text_loader if on_text else run.loader).next_batch()
    x, y = batch[0], batch[1]
    if run.probe is not None and run.spec.train.loss_reach >= 0 and run.spec.model.recursive:
        y = within_reach(y, batch[2], r, run.spec.train.loss_reach)
    hints = batch[3] if run.probe is not None else None  # None unless the run trains on hints
    device = run.dist.device
    return (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
            None if hints is None else hints.to(device, non_blocking=True))


def train_step(run: Run, step: int) -> StepMetrics:
    """One optimizer step (`grad_accum` micro-steps, each at its own sampled r); returns the step's metrics."""
    t0 = time.perf_counter()
    cfg, dist = run.spec.train, run.dist
    lrm = lr_multiplier(step, cfg)
    set_lr(run.optimizers, lrm)
    rs = run.sampler.sample(step, run.grad_accum)
    on_text = text_microsteps(run, step)
    loss_sum = torch.zeros((), device=dist.device)
    flops, n_tokens = 0.0, 0
    for i, r in enumerate(rs):
        x, y, hints = batch_for(run, r, on_text[i])
        # Ranks reduce gradients only on the last micro-step; DDP / FSDP2 average over ranks, the division
        # averages over micro-steps, so the update is that of one process seeing the whole global batch.
        with distributed.gradient_sync(run.model, enabled=i == len(rs) - 1):
            with run.dtype.autocast(dist.device):
                loss = micro_loss(run.model, x, y, r, step * run.grad_accum + i, cfg, run.spec.model.recursive,
                                  hints)
            (loss / run.grad_accum).backward()
        loss_sum += loss.detach()
        flops += flops_per_token(run.spec.model, r, cfg.bptt_k, seq_len=x.size(1)) * x.numel()
        n_tokens += x.numel()
    # Gradients are already reduced: identical replicas under DDP, DTensors whose norm is global under FSDP2,
    # so this is the single-process clip.
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or float("inf"))
    for opt in run.optimizers:
        opt.step()
    run.model.zero_grad(set_to_none=True)
    loss_val = distributed.mean_loss_checking_depths(loss_sum.double() / run.grad_accum, rs, dist, step + 1)
    if run.rank_log is not None:
        run.rank_log.write(json.dumps({"step": step + 1, "r": rs, "loss": float(loss_sum) / run.grad_accum}) + "\n")
        run.rank_log.flush()
    if not math.isfinite(loss_val):
        raise Diverged(f"loss became {loss_val} at step {step}; lower the learning rates")
    dt = time.perf_counter() - t0
    tokens, flops = n_tokens * dist.world_size, flops * dist.world_size
    return StepMetrics(step + 1, loss_val, rs, lrm, distributed.as_float(grad_norm), tokens / dt, flops / tokens,
                       mfu(flops / tokens, tokens / dt, run.peak.flops * dist.world_size), dt,
                       sum(on_text) if run.text_loader is not None else None)


def evaluate(run: Run, step: int) -> dict:
    """Held-out bpb at each evaluation depth. SFT: `val_bpb` over the assistant tokens of held-out conversations,
    and `val_bpb_text` over held-out pretraining text (plain-text bpb, which SFT should keep near the base's).
    A probe run: label accuracy instead (train/probes.py)."""
    if not distributed.evaluates(run.model, run.dist):
        return {"step": step, "val_bpb": {}}
    if run.probe is not None:
        record = probes.validation(run.net, run.probe, run.eval_depths, run.dtype, run.spec.train.eval_tokens, step)
        line = probes.describe(record)
    else:
        record = text_validation(run, step)
        line = (f"step {step}: val bpb " + ", ".join(f"r={r}: {v:.4f}" for r, v in record["val_bpb"].items())
                + (" · plain text " + ", ".join(f"r={r}: {v:.4f}" for r, v in record["val_bpb_text"].items())
                   if "val_bpb_text" in record else ""))
    distributed.reset_shards(run.model)
    run.telemetry.log(record)
    run.telemetry.message(line)
    return record


def text_validation(run: Run, step: int) -> dict:
    t, token_bytes = run.spec.train, run.tokenizer.token_bytes()

    def text_bpb(r: int) -> float:
        return evaluate_bpb(run.net, run.data.val, token_bytes, t.batch_size, run.spec.model.seq_len,
                            t.eval_tokens, num_recur=r, dtype=run.dtype)

    def rows_bpb(r: int) -> float:
        return evaluate_rows_bpb(run.net, run.sft.val_x, run.sft.val_y, token_bytes, t.batch_size, r, run.dtype)

    record = {"step": step, "val_bpb": {str(r): (rows_bpb if run.sft else text_bpb)(r) for r in run.eval_depths}}
    if run.sft is not None and run.data is not None:
        record["val_bpb_text"] = {str(r): text_bpb(r) for r in run.eval_depths}
    return record


def save(run: Run, step: int) -> None:
    """Write out/checkpoint/step-NNNNNN (and point `latest` at it). Gathering is collective under FSDP2 (every
    rank takes part), writing is rank 0's; the barrier means no rank moves on (or exits) before the checkpoint is
    in place. A save that fails (a full disk) stops every rank with rank 0's one-line error, metrics.jsonl cut back
    to the last checkpoint that is complete, so a resume logs each step once."""
    weights = distributed.model_state(run.model)
    opt_states = distributed.optimizer_states(run.model, run.optimizers)
    error = None
    if run.dist.is_main:
        try:
            checkpoint.save_step(run.spec.out / "checkpoint", step, run.net, run.spec.model, run.spec.train,
                                 run.tokenizer, run.optimizers,
                                 {"step": step, "loader": run.loader.state_dict(),
                                  **({"text_loader": run.text_loader.state_dict()} if run.text_loader else {}),
                                  "grad_accum": run.grad_accum},
                                 weights=weights, optimizer_states=opt_states, keep=run.spec.train.keep_checkpoints)
        except UserError as e:
            error = str(e)
            good = checkpoint.find(run.spec.out)
            truncate_log(run.spec.out / "metrics.jsonl", checkpoint.step_number(good) if good else 0)
    if distributed.main_decides(run.dist, error is not None):
        raise UserError(error or "rank 0 could not save the checkpoint (its error says why)")
    distributed.barrier(run.dist)


def save_due(run: Run, done: int, last_save: float) -> bool:
    """Every `save_every` steps, and whenever `save_every_min` minutes passed since the last save (rank 0's clock)."""
    cfg = run.spec.train
    if cfg.save_every and done % cfg.save_every == 0:
        return True
    if not cfg.save_every_min:
        return False
    return distributed.main_decides(run.dist, monotonic() - last_save >= 60 * cfg.save_every_min)


def train(spec: RunSpec, progress: bool = True) -> StepMetrics | None:
    """Train to `max_steps` (or `stop_after` more steps) and write spec.out/checkpoint; returns the last step's
    metrics with the final evaluation (on rank 0; other ranks of a torchrun job, and a run with no step left to
    take, return None, so only one copy is printed)."""
    run = setup(spec, progress)
    cfg, last, last_save = spec.train, None, monotonic()
    run.model.train()
    for step in range(run.start_step, run.end_step):
        last = train_step(run, step)
        done = last.step
        if done % cfg.log_every == 0 or done == run.end_step:
            run.telemetry.log(last.record())
        run.telemetry.progress(loss=f"{last.loss:.3f}", r=f"{last.r_mean:.1f}", tok_s=f"{last.tok_s:.0f}",
                               mfu=f"{100 * last.mfu:.1f}%")
        if cfg.eval_every and done % cfg.eval_every == 0 and done != run.end_step:
            evaluate(run, done)
        if done != run.end_step and save_due(run, done, last_save):
            save(run, done)
            last_save = monotonic()
    if run.end_step > run.start_step:
        last.evaluation = evaluate(run, run.end_step)
        save(run, run.end_step)
    run.telemetry.close()
    if run.rank_log is not None:
        run.rank_log.close()
    distributed.shutdown()
    return last if run.dist.is_main else None


def train_or_resume(out: Path, fresh: Callable[[], RunSpec], progress: bool = False) -> StepMetrics | None:
    """Train `fresh()` into `out`, or, when `out` holds the checkpoint of an interrupted run, resume it to its end."""
    interrupted = checkpoint.find(out) is not None
    return train(resume_spec(out, out, train={"stop_after": 0}) if interrupted else fresh(), progress)
