"""Gradient check run under torchrun by tests/train/test_distributed.py (not collected by pytest itself).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/dist_grad_worker.py ddp|fsdp

Each rank trains on its shard with the wrapped model while a plain model sees the whole global batch; after every
step the gradients must match, for r < k, r = k, r > k (no-grad iterations) and k = 1, with gradient sync skipped on
the first of two micro-steps.
"""

import datetime
import os
import sys

import torch
from torch.distributed.tensor import DTensor

from recurchat.config import ModelConfig
from recurchat.model.recurrent import RecurrentLM
from recurchat.train import distributed


def main(mode: str) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    info = distributed.DistInfo(rank=rank, world_size=world, local_rank=rank)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_head=2, n_kv_head=1, n_prelude=1, n_shared=2, n_coda=1,
                      mean_recur=2, r_max=8, seq_len=16)
    torch.manual_seed(0)
    reference = RecurrentLM(cfg)
    torch.manual_seed(0)
    model = distributed.wrap(RecurrentLM(cfg), info, mode)
    g = torch.Generator().manual_seed(1)
    # r < k, r = k, r > k (no-grad iterations) and k = 1, in an order where r changes every step
    for r, k in [(1, 2), (5, 2), (2, 2), (6, 1), (3, 3), (4, 2)]:
        x = torch.randint(0, cfg.vocab_size, (2, world, 2, cfg.seq_len), generator=g)  # micro, rank, row
        y = torch.randint(0, cfg.vocab_size, (2, world, 2, cfg.seq_len), generator=g)
        for micro in range(2):
            with distributed.gradient_sync(model, enabled=micro == 1):
                (model(x[micro, rank], y[micro, rank], num_recur=r, bptt_k=k) / 2).backward()
            reference(x[micro].flatten(0, 1), y[micro].flatten(0, 1), num_recur=r, bptt_k=k).div(2).backward()
        for (name, p), q in zip(distributed.unwrap(model).named_parameters(), reference.parameters()):
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            diff = (grad - q.grad).abs().max().item()
            assert diff < 1e-6, f"{mode} r={r} k={k} {name}: gradient differs by {diff}"
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    # ranks that drew different depths are caught
    loss = torch.tensor(1.0)
    assert abs(distributed.mean_loss_checking_depths(loss * (rank + 1), [2, 3], info, 1) - 1.5) < 1e-6
    try:
        distributed.mean_loss_checking_depths(loss, [2, 3 + rank], info, 2)
    except RuntimeError as e:
        assert "different recursion depths" in str(e)
    else:
        raise AssertionError("ranks with different depths were not caught")
    print(f"rank {rank}: gradients match", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
