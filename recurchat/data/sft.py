"""SFT data: conversations from a JSONL file or the built-in tasks, rendered into (x, y) rows with loss masks.

    recurchat sft --ckpt runs/tiny --data builtin:hops,arith --out runs/tiny-sft

`builtin:NAME[,NAME…]` draws `n_per_task` training conversations per task from its train stream (uniform over
difficulty) and a held-out set from its test stream — the two never share a prompt. A JSONL file of
{"messages": [...]} holds its last 5% (at least one) back for validation. Exercise: `pytest tests/train/test_sft.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recurchat.data.chat import load_conversations, sft_rows
from recurchat.data.tasks import get_task, stream, to_chat
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError

BUILTIN = "builtin:"


@dataclass
class SFTData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    description: str


def conversations_for(spec: str, n_per_task: int, seed: int) -> tuple[list, list]:
    """(train, val) conversations for a --data spec."""
    if spec.startswith(BUILTIN):
        names = [n.strip() for n in spec[len(BUILTIN):].split(",") if n.strip()]
        if not names:
            raise UserError(f"--data {spec!r} names no task (e.g. builtin:hops,arith)")
        train, val = [], []
        for name in names:
            task = get_task(name)
            train += [to_chat(ex) for ex in stream(task, "train", seed, n_per_task)]
            val += [to_chat(ex) for ex in stream(task, "test", seed, max(32, n_per_task // 20))]
        return train, val
    convs = load_conversations(spec)
    n_val = max(1, len(convs) // 20)
    if len(convs) < 2:
        raise UserError(f"{spec}: need at least 2 conversations (one is held out for validation)")
    return convs[:-n_val], convs[-n_val:]


def trim(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row: short chats then train at a fraction of the cost."""
    used = (y >= 0).any(dim=0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1
    return x[:, :width].contiguous(), y[:, :width].contiguous()


def build_sft_data(spec: str, tokenizer: Tokenizer, seq_len: int, n_per_task: int = 2000, seed: int = 0) -> SFTData:
    if not spec:
        raise UserError("sft needs --data FILE.jsonl or --data builtin:NAME[,NAME…]")
    train, val = conversations_for(spec, n_per_task, seed)
    train_x, train_y = trim(*sft_rows(tokenizer, train, seq_len))
    val_x, val_y = trim(*sft_rows(tokenizer, val, seq_len))
    return SFTData(train_x, train_y, val_x, val_y, f"{spec}: {len(train_x)} train / {len(val_x)} val conversations")
