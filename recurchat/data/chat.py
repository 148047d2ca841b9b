"""Chat format: render conversations to token ids with an assistant-only loss mask, and pack them for SFT.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Rendered layout:

    <|bos|> <|system_start|> … <|system_end|> <|user_start|> … <|user_end|>
            <|assistant_start|> … <|assistant_end|> <|user_start|> … …

The loss mask is 1 on assistant content tokens and on the closing <|assistant_end|> (so the model learns when to
stop), 0 everywhere else. An imported tokenizer spells each marker in its source's markup (data/tokenizer.py's
ChatFormat: ChatML's <|im_start|>user\n … <|im_end|>\n) and adds its template's default system message. Content is
encoded as plain text, so a literal "<|user_end|>" typed by a user never becomes a special token.
Exercised by `pytest tests/data/test_chat.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from recurchat.data.readers import jsonl_records
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -1  # the target value cross_entropy(ignore_index=-1) skips


def validate_conversation(messages: object, require_assistant: bool = True) -> list[dict]:
    """Check `messages` is a non-empty list of well-formed messages; UserError (no location) otherwise."""
    if not isinstance(messages, list):
        raise UserError(f"conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise UserError("conversation is empty (no messages)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"message {i} is {type(message).__name__}, expected an object with role and content")
        for key in ("role", "content"):
            if key not in message:
                raise UserError(f"message {i} is missing field {key!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UserError(f"message {i} content is {type(content).__name__}, expected a string")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError("conversation has no assistant turn (nothing to learn from)")
    return messages


def _render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    fmt = tokenizer.chat_format
    ids = [tokenizer.bos_id] if fmt is None or fmt.chat_bos else []
    if fmt is not None and fmt.default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": fmt.default_system}, *messages]  # as the source's template does
    mask = [0] * len(ids)
    contents = tokenizer.encode_batch([m["content"] for m in messages])
    for message, content_ids in zip(messages, contents):
        role = message["role"]
        supervised = 1 if role == "assistant" else 0
        start, end = tokenizer.marker(f"{role}_start"), tokenizer.marker(f"{role}_end")
        ids.extend(start)
        mask.extend([0] * len(start))
        ids.extend(content_ids)
        mask.extend([supervised] * len(content_ids))
        ids.extend(end)
        mask.extend([supervised] * len(end))
    return ids, mask


def render_conversation(
    tokenizer: Tokenizer, messages: list[dict], max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) for a conversation with at least one assistant turn; the first max_len tokens if given."""
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids, mask = _render(tokenizer, validate_conversation(messages))
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids of `messages` (ending with a user turn) followed by <|assistant_start|>, for generation."""
    validate_conversation(messages, require_assistant=False)
    if messages[-1]["role"] != "user":
        raise UserError(f"a prompt must end with a user message, not {messages[-1]['role']!r}")
    ids, _ = _render(tokenizer, messages)
    return ids + tokenizer.marker("assistant_start")


def load_conversations(path: str | Path, require_assistant: bool = True) -> list[list[dict]]:
    """Conversations from a JSONL file of {"messages": [...]} records; errors say file:line and the problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"conversation file not found: {path}")
    conversations = []
    for lineno, record in jsonl_records(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise UserError(f"{path}:{lineno}: missing field 'messages'")
        try:
            conversations.append(validate_conversation(record["messages"], require_assistant))
        except UserError as e:
            raise UserError(f"{path}:{lineno}: {e}") from e
    if not conversations:
        raise UserError(f"{path}: no conversations (file is empty)")
    return conversations


def sft_rows(
    tokenizer: Tokenizer, conversations: Sequence[list[dict]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (x, y) [N, seq_len], one conversation per row (truncated to seq_len + 1 tokens, then shifted).

    y is the next token where that target is supervised (mask 1) and IGNORE_INDEX elsewhere, padding included;
    x is padded with <|pad|>. Conversations whose supervised tokens were all truncated away are dropped, because
    a row with no target adds nothing but would make a batch of them a 0/0 (NaN) loss.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not conversations:
        raise UserError("no conversations to pack into SFT rows")
    xs, ys = [], []
    for messages in conversations:
        ids, mask = render_conversation(tokenizer, messages, max_len=seq_len + 1)
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        if all(t == IGNORE_INDEX for t in targets):
            continue
        pad = seq_len - len(targets)
        xs.append(ids[:-1] + [tokenizer.pad_id] * pad)
        ys.append(targets + [IGNORE_INDEX] * pad)
    if not xs:
        raise UserError(f"no conversation has an assistant token within seq_len {seq_len} (all truncated away)")
    return torch.tensor(xs, dtype=torch.int64), torch.tensor(ys, dtype=torch.int64)
