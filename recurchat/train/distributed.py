"""Multi-process training: torchrun process groups, DDP / FSDP2 wrapping, cross-rank checks, full state dicts.

    torchrun --standalone --nproc_per_node=2 -m recurchat train --preset cpu-smoke --batch-size 2 --out runs/ddp
    torchrun --standalone --nproc_per_node=2 -m recurchat train --preset cpu-smoke --batch-size 2 --out runs/fsdp \
        --parallel fsdp

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process and every helper here is a no-op
(the model is not wrapped). gloo on CPU, nccl on CUDA. Rank 0 prepares data first (the others then reuse its
tokenizer and token cache), logs, and writes checkpoints; a checkpoint always holds full (unsharded) tensors in
the single-process format, so it resumes on any world size under either `--parallel` mode.
Exercise: `pytest tests/train/test_distributed.py`.

torch.compile (`--compile`, on by default on CUDA) compiles the model's stages, not the wrapper: under DDP the
compiled backward of a stage produces all of that stage's gradients at once, so the all-reduce overlaps less
with compute than in eager mode but is the same arithmetic; under FSDP2 the compiled iteration calls Blocks that
carry the all-gather / reduce-scatter hooks. Both modes ran to completion with --compile on CPU (2 ranks,
cpu-smoke); the tests leave compile off because a CPU compile costs ~30 s per process.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from recurchat.config import PARALLEL_MODES

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> DistInfo:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        # Tear down only once every rank is done with its last collective; a rank that leaves early can abort a
        # peer still finishing one.
        dist.barrier()
        # gloo frees a finished work object on its worker thread, and freeing the tensors of a collective called
        # from Python takes the GIL. If the main thread dropped the last reference to the process group (DDP's
        # reducer holds one) before that, it would join the worker while holding the GIL: a deadlock at exit,
        # seen in ~1 run in 10 on CPU. Sleeping releases the GIL so the worker finishes first.
        time.sleep(0.1)
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def main_decides(info: DistInfo, flag: bool) -> bool:
    """Rank 0's `flag` on every rank: a decision read from a clock must be the same everywhere (a checkpoint save
    is collective), and each rank's clock says something slightly different."""
    if not info.distributed:
        return flag
    decided = torch.tensor([int(flag)], device=info.device)
    dist.broadcast(decided, src=0)
    return bool(decided.item())


@contextlib.contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the body first, then the others: tokenizer training and token caches are written once.

    Rank 0 releases the others even when the body raises, so they fail the same way instead of hanging.
    """
    if info.distributed and not info.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if info.distributed and info.is_main:
            dist.barrier()


def wrap(model: torch.nn.Module, info: DistInfo, mode: str) -> torch.nn.Module:
    """DDP or FSDP2 around `model` (already on its device, weights already loaded); unchanged for one process.

    DDP settings, and why (tests/train/test_distributed.py checks the gradients they give for r < k, r = k, r > k):
      * find_unused_parameters=False. The recurrent blocks run r times per forward, the first r−k under
        torch.no_grad(). No autograd graph is recorded there, so those calls fire no reducer hooks and need no
        bookkeeping; the last min(k, r) ≥ 1 iterations do record one, and autograd sums every use of a weight
        into its one AccumulateGrad node, where DDP's hook sits, so each hook fires exactly once per backward
        whatever r is. Every parameter (embed, prelude, adapter, recurrent stack, coda, head) gets a gradient on
        every step for every r ≥ 1 — the standard model (R = 0) simply has no adapter — so the per-forward graph
        walk of find_unused_parameters=True buys nothing. Should a parameter ever sit out a step (say, an exit
        gate used only at some r), DDP fails at the next forward with "Expected to have finished reduction in the
        prior iteration": that is the moment to turn it on.
      * static_graph=False. Varying r leaves the set of used parameters and the one-firing-per-hook count
        unchanged, and static_graph=True does give the same gradients then; but it dies on a reducer INTERNAL
        ASSERT ("expect_autograd_hooks_") when the first iteration runs under no_sync(), which accumulation does,
        and its recorded hook counts would be wrong the moment they depended on r (e.g. reentrant activation
        checkpointing per grad iteration: min(k, r) firings).
      * forward_sync_buffers=False (torch ≥ 2.13's name for broadcast_buffers=False): the only buffers are the
        constant rotary tables, identical on every rank; re-broadcasting them on each forward is pure overhead.

    FSDP2: each Block is sharded on its own, then the root (embedding, adapter, head). The recurrent Blocks keep
    their gathered weights through the forward (reshard_after_forward=False) because the loop calls them r times:
    one all-gather per forward instead of r. No MixedPrecisionPolicy: bf16 comes from autocast as under DDP, so
    both modes compute the same gradients (all-gathers move fp32). torch.optim.Muon works on the sharded (DTensor)
    matrices: DTensor redistributes inside the Newton–Schulz matmuls, so every iteration communicates, and the
    update equals the single-process one up to the bf16 rounding Muon computes in anyway (partial sums are
    rounded in a different order).
    """
    if not info.distributed:
        return model
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                       forward_sync_buffers=False, find_unused_parameters=False,
                                       static_graph=False)
    if mode != "fsdp":
        raise ValueError(f"unknown parallel mode {mode!r} (choose from {', '.join(PARALLEL_MODES)})")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # Every rank built identical weights (same seed, same checkpoint), so sharding each rank's own copy is
    # consistent without a broadcast.
    for block in [*model.prelude, *model.coda]:
        fully_shard(block, mesh=mesh)
    for block in model.recur:
        fully_shard(block, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The RecurrentLM itself (FSDP2 shards in place, so only DDP has a wrapper to remove)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def evaluates(model: torch.nn.Module, info: DistInfo) -> bool:
    """Whether this rank runs evaluation: all ranks under FSDP2 (sharded weights need every rank to gather them),
    otherwise rank 0 alone (a DDP replica holds every weight; the others would only repeat the work)."""
    return info.is_main or isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Wrap a micro-step's forward and backward: with `enabled` False, gradients only accumulate locally.

    All but the last micro-step of an accumulation skip the all-reduce (DDP no_sync) / reduce-scatter (FSDP2);
    the last one reduces the accumulated sum, so communication per optimizer step is the same for any accumulation.
    """
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


def reset_shards(model: torch.nn.Module) -> None:
    """Put FSDP2 modules back on their sharded weights (after a no-grad evaluation left some gathered)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def as_float(value: torch.Tensor | float) -> float:
    """A Python float from a plain tensor or a replicated DTensor (clip_grad_norm_'s result under FSDP2)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def r_signature(rs: list[int]) -> int:
    """An exact (< 2**32, so float64-safe) fingerprint of one step's recursion depths."""
    return zlib.crc32(",".join(map(str, rs)).encode())


def mean_loss_checking_depths(loss: torch.Tensor, rs: list[int], info: DistInfo, step: int) -> float:
    """The loss averaged over ranks, and a check that every rank drew the same depths `rs` for this step.

    One small all-gather per step. Different depths across ranks would still train (DDP averages whatever the
    ranks computed) but would no longer be the single-process run, so it is an error, not a warning.
    """
    if not info.distributed:
        return float(loss)
    mine = torch.stack([loss.detach().double(), torch.tensor(float(r_signature(rs)), dtype=torch.float64,
                                                              device=loss.device)])
    gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    table = torch.stack(gathered).cpu()
    if not bool((table[:, 1] == table[0, 1]).all()):
        raise RuntimeError(f"ranks drew different recursion depths at step {step} (this rank: {rs}); the depth "
                           "sampler must be seeded identically everywhere")
    return float(table[:, 0].mean())


# -- checkpoint state: full tensors on rank 0, in the same per-optimizer format a single process writes ----------

def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in unwrap(model).named_parameters()}


def _ordered_names(opt: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    # Optimizer.state_dict() numbers parameters 0, 1, ... in param_groups order; this is that numbering.
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU weights, keyed like RecurrentLM.state_dict(). Collective under FSDP2; complete on rank 0 only."""
    if isinstance(model, FSDPModule):
        reset_shards(model)
        return get_model_state_dict(model, options=_FULL)
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


def optimizer_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """Each optimizer's state_dict() (integer parameter ids) with full tensors. Collective under FSDP2 (the
    sharded moments are gathered onto rank 0's CPU); complete on rank 0 only."""
    if not isinstance(model, FSDPModule):
        return [opt.state_dict() for opt in optimizers]
    full = get_optimizer_state_dict(model, optimizers, options=_FULL)
    names = _param_names(model)
    states = []
    for opt in optimizers:
        by_id = {i: full["state"][n] for i, n in enumerate(_ordered_names(opt, names)) if n in full.get("state", {})}
        states.append({"state": by_id, "param_groups": opt.state_dict()["param_groups"]})
    return states


def load_optimizer_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                          states: list[dict]) -> None:
    """The inverse of optimizer_states on any world size: full tensors are re-sharded to match FSDP2 params."""
    if not isinstance(model, FSDPModule):
        for opt, sd in zip(optimizers, states):
            opt.load_state_dict(sd)
        return
    names = _param_names(model)
    merged: dict = {"state": {}, "param_groups": []}
    for opt, sd in zip(optimizers, states):
        ordered = _ordered_names(opt, names)
        merged["state"].update({ordered[int(i)]: s for i, s in sd["state"].items()})
        merged["param_groups"] += [dict(g, params=[ordered[int(i)] for i in g["params"]]) for g in sd["param_groups"]]
    set_optimizer_state_dict(model, optimizers, merged, options=StateDictOptions(full_state_dict=True))
