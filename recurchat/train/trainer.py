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
from pathlib import Path

import torch

from recurchat.config import ModelConfig, TrainConfig
from recurchat.data.corpus import prepare_data
from recurchat.data.loader import RowLoader, TokenLoader
from recurchat.errors import UserError
from recurchat.eval.bpb import evaluate_bpb, evaluate_rows_bpb
from recurchat.model import hardware
from recurchat.model.depth import DepthSampler
from recurchat.model.flops import flops_per_token, mfu
from recurchat.model.recurrent import RecurrentLM
from recurchat.train import checkpoint, distributed
from recurchat.train.optim import build_optimizers, lr_multiplier, set_lr
from recurchat.train.telemetry import Telemetry


def resumable_loader_state(state: dict, global_rows: int, grad_accum: int) -> dict:
    """The checkpoint's data position, re-expressed for this run's split of a step into ranks × micro-batches.

    The position is a global row offset, so only the rows per optimizer step must agree. A run that kept
    --batch-size and changed its world size (accumulation adapting) splits the same rows differently; the loader
    itself only accepts an unchanged world_size × batch_size, so relabel the split here and let it check the rest
    (seq_len, data). Beyond the next epoch end the two splits may skip a different handful of leftover rows.
    """
    saved = dict(state["loader"])
    rows_per_step_then = saved.get("global_batch_rows", 0) * int(state.get("grad_accum", 0))
    if saved.get("global_batch_rows") != global_rows and rows_per_step_then == global_rows * grad_accum:
        saved["global_batch_rows"] = global_rows
    return saved


def eval_depths(model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[int]:
    if not model_cfg.recursive:
        return [1]
    if train_cfg.eval_recur:
        try:
            depths = [int(r) for r in train_cfg.eval_recur.split(",") if r.strip()]
        except ValueError:
            raise UserError(f"bad --eval-recur {train_cfg.eval_recur!r}: expected comma-separated integers") from None
    else:
        depths = [1, model_cfg.mean_recur, 2 * model_cfg.mean_recur]
    return sorted({min(max(1, r), model_cfg.r_max) for r in depths})


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
          progress: bool = True, init_from: str | Path | None = None, sft_spec: str = "") -> dict:
    """Train to `max_steps` (or `stop_after` more steps) and write out_dir/checkpoint; returns the last metrics
    (on rank 0; other ranks of a torchrun job return {} so only one copy is printed).

    Pretraining reads a token stream (train_cfg.data or the embedded corpus). With `sft_spec` (a JSONL file or
    builtin:TASKS) it trains on rendered conversations with loss on assistant tokens only; `init_from` starts from
    another checkpoint's weights and tokenizer (the base model), without its optimizer state.
    """
    model_cfg.validate()
    train_cfg.validate()
    out_dir = Path(out_dir)
    ckpt = None
    if resume is not None:
        ckpt = checkpoint.load(resume)
        if ckpt.model_cfg != model_cfg:
            diff = [f.name for f in dataclasses.fields(ModelConfig)
                    if getattr(ckpt.model_cfg, f.name) != getattr(model_cfg, f.name)]
            raise UserError(f"--resume {resume}: model config differs from the checkpoint in {', '.join(diff)}")
        if not ckpt.has_state():
            raise UserError(f"--resume {resume}: checkpoint has no resumable state")

    base = checkpoint.load(init_from) if (init_from is not None and ckpt is None) else None
    if base is not None and base.model_cfg != model_cfg:
        raise UserError(f"--ckpt {init_from}: model config differs from the requested one")

    dist_info = distributed.init()
    device = dist_info.device
    torch.manual_seed(train_cfg.seed)
    log = print if dist_info.is_main else (lambda *a, **k: None)

    known = ckpt or base
    # Rank 0 trains the tokenizer and writes the token cache; the others then find both and only read them.
    with distributed.main_first(dist_info):
        if sft_spec:
            from recurchat.data.sft import build_sft_data

            tokenizer = known.tokenizer
            sft = build_sft_data(sft_spec, tokenizer, model_cfg.seq_len, train_cfg.sft_examples, train_cfg.seed)
            log(f"sft data {sft.description}")
        else:
            data = prepare_data(train_cfg.data or None, model_cfg.vocab_size,
                                tokenizer=known.tokenizer if known is not None else None, log=log)
            tokenizer = data.tokenizer
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{model_cfg.vocab_size}")

    rows_per_step = train_cfg.total_batch_tokens / (train_cfg.batch_size * model_cfg.seq_len * dist_info.world_size)
    if rows_per_step < 1 or rows_per_step != int(rows_per_step):
        raise UserError(f"total_batch_tokens={train_cfg.total_batch_tokens} is not a multiple of batch_size × seq_len"
                        f" × world_size = {train_cfg.batch_size * model_cfg.seq_len * dist_info.world_size}"
                        + (f"; with {dist_info.world_size} ranks, lower --batch-size"
                           if dist_info.distributed and rows_per_step < 1 else ""))
    grad_accum = int(rows_per_step)

    net = RecurrentLM(model_cfg).to(device)  # the bare model: eval, parameter counts, compile
    # Weights go in before wrapping (FSDP2 shards whatever the module holds); optimizers are built after it, on
    # the parameters the wrapper updates (FSDP2 replaces them with sharded DTensors).
    if base is not None:
        checkpoint.load_model_weights(net, base)
        log(f"initialised from {base.path}")
    if ckpt is not None:
        checkpoint.load_model_weights(net, ckpt)
    model = distributed.wrap(net, dist_info, train_cfg.parallel)
    # bf16 only where the device runs it natively (model/hardware.py); Muon orthogonalises in the same dtype.
    dtype = hardware.choose_dtype(train_cfg.dtype, device)
    optimizers = build_optimizers(net, train_cfg, dtype.torch_dtype)  # names without DDP's "module." prefix
    sampler = DepthSampler(train_cfg.recur_dist, model_cfg.mean_recur, model_cfg.r_max, train_cfg.recur_sigma,
                           train_cfg.seed, int(train_cfg.curriculum_frac * train_cfg.max_steps))
    if sft_spec:
        loader = RowLoader(sft.train_x, sft.train_y, train_cfg.batch_size, seed=train_cfg.seed,
                           rank=dist_info.rank, world_size=dist_info.world_size)
    else:
        loader = TokenLoader(data.train, train_cfg.batch_size, model_cfg.seq_len, seed=train_cfg.seed,
                             rank=dist_info.rank, world_size=dist_info.world_size)
    start_step = 0
    if ckpt is not None:
        state = checkpoint.load_train_state(
            ckpt, optimizers, lambda opts, states: distributed.load_optimizer_states(model, opts, states))
        loader.load_state_dict(resumable_loader_state(state, loader.global_rows, grad_accum))
        start_step = int(state["step"])
        log(f"resumed from {ckpt.path} at step {start_step}")

    if train_cfg.compile if train_cfg.compile is not None else device.type == "cuda":
        net.compile_stages()
    autocast = dtype.autocast(device)
    peak = hardware.resolve_peak(device, dtype, model_cfg, train_cfg.batch_size * model_cfg.seq_len,
                                 train_cfg.peak_flops)
    token_bytes = tokenizer.token_bytes()
    depths = eval_depths(model_cfg, train_cfg)
    end_step = train_cfg.max_steps
    if train_cfg.stop_after > 0:
        end_step = min(end_step, start_step + train_cfg.stop_after)
    params = net.num_params()
    if ckpt is None and dist_info.is_main:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run (--overwrite) starts a fresh log
    rank_log = None
    if dist_info.distributed:
        # Every rank records its own depths (and local loss): cheap, and the evidence that ranks agree.
        rank_path = out_dir / "ranks" / f"rank{dist_info.rank}.jsonl"
        rank_path.parent.mkdir(parents=True, exist_ok=True)
        rank_log = open(rank_path, "w" if ckpt is None else "a", encoding="utf-8")
    telemetry = Telemetry(out_dir, train_cfg.max_steps, start_step, enabled=dist_info.is_main,
                          wandb_project=train_cfg.wandb, progress=progress,
                          config={"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg)})
    log(f"model: {params['total']:,} parameters ({'recursive' if model_cfg.recursive else 'standard'}, "
        f"P/R/C = {model_cfg.n_prelude}/{model_cfg.n_recur}/{model_cfg.n_coda}, r̄ = {model_cfg.mean_recur}); "
        f"{grad_accum} micro-steps of {train_cfg.batch_size}×{model_cfg.seq_len} per step"
        + (f" on each of {dist_info.world_size} ranks ({train_cfg.parallel})" if dist_info.distributed else "")
        + f"; {hardware.banner(device, dtype, peak)}")
    telemetry.log({"step": start_step, "run": hardware.run_record(device, dtype, peak)})

    def val_bpb(r: int) -> float:
        if sft_spec:
            return evaluate_rows_bpb(net, sft.val_x, sft.val_y, token_bytes, train_cfg.batch_size, r, autocast)
        return evaluate_bpb(net, data.val, token_bytes, train_cfg.batch_size, model_cfg.seq_len,
                            train_cfg.eval_tokens, num_recur=r, autocast=autocast)

    def run_eval(step: int) -> dict:
        if not distributed.evaluates(model, dist_info):
            return {"step": step, "val_bpb": {}}
        bpb = {str(r): val_bpb(r) for r in depths}
        distributed.reset_shards(model)
        record = {"step": step, "val_bpb": bpb}
        telemetry.log(record)
        telemetry.message(f"step {step}: val bpb " + ", ".join(f"r={r}: {v:.4f}" for r, v in bpb.items()))
        return record

    def save(step: int) -> None:
        # Gathering is collective under FSDP2 (every rank takes part), writing is rank 0's; the barrier means no
        # rank moves on (or exits) before the checkpoint is in place.
        weights = distributed.model_state(model)
        opt_states = distributed.optimizer_states(model, optimizers)
        if dist_info.is_main:
            checkpoint.save(out_dir / "checkpoint", net, model_cfg, train_cfg, tokenizer, optimizers,
                            {"step": step, "loader": loader.state_dict(), "grad_accum": grad_accum},
                            weights=weights, optimizer_states=opt_states)
        distributed.barrier(dist_info)

    last: dict = {}
    model.train()
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, train_cfg)
        set_lr(optimizers, lrm)
        rs = sampler.sample(step, grad_accum)
        loss_sum = torch.zeros((), device=device)
        flops = 0.0
        n_tokens = 0
        for i, r in enumerate(rs):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Ranks reduce gradients only on the last micro-step; DDP / FSDP2 average over ranks, the division
            # averages over micro-steps, so the update is that of one process seeing the whole global batch.
            with distributed.gradient_sync(model, enabled=i == len(rs) - 1):
                with autocast:
                    loss = model(x, y, num_recur=r, bptt_k=train_cfg.bptt_k)
                (loss / grad_accum).backward()
            loss_sum += loss.detach()
            flops += flops_per_token(model_cfg, r, train_cfg.bptt_k, seq_len=x.size(1)) * x.numel()
            n_tokens += x.numel()
        # Gradients are already reduced: identical replicas under DDP, DTensors whose norm is global under FSDP2,
        # so this is the single-process clip.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip or float("inf"))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss_val = distributed.mean_loss_checking_depths(loss_sum.double() / grad_accum, rs, dist_info, step + 1)
        if rank_log is not None:
            rank_log.write(json.dumps({"step": step + 1, "r": rs, "loss": float(loss_sum) / grad_accum}) + "\n")
            rank_log.flush()
        if not math.isfinite(loss_val):
            raise RuntimeError(f"loss became {loss_val} at step {step}; lower the learning rates")
        dt = time.perf_counter() - t0
        tokens = n_tokens * dist_info.world_size
        tok_s = tokens / dt
        flops *= dist_info.world_size
        last = {"step": step + 1, "loss": loss_val, "r": rs, "r_mean": sum(rs) / len(rs), "lr_mult": lrm,
                "grad_norm": distributed.as_float(grad_norm), "tok_s": tok_s, "flops_per_token": flops / tokens,
                "mfu": mfu(flops / tokens, tok_s, peak.flops * dist_info.world_size), "dt": dt}
        if (step + 1) % train_cfg.log_every == 0 or step + 1 == end_step:
            telemetry.log(last)
        telemetry.progress(loss=f"{loss_val:.3f}", r=f"{last['r_mean']:.1f}", tok_s=f"{tok_s:.0f}",
                           mfu=f"{100 * last['mfu']:.1f}%")
        done = step + 1
        if train_cfg.eval_every and done % train_cfg.eval_every == 0 and done != end_step:
            run_eval(done)
        if train_cfg.save_every and done % train_cfg.save_every == 0 and done != end_step:
            save(done)
    if end_step > start_step:
        last["val_bpb"] = run_eval(end_step)["val_bpb"]
        save(end_step)
    telemetry.close()
    if rank_log is not None:
        rank_log.close()
    distributed.shutdown()
    return last if dist_info.is_main else {}
