"""Byte-level BPE tokenizer (HF `tokenizers`) with recurchat's reserved special tokens.

Every byte is in the base alphabet, so any text encodes and decode(encode(s)) == s. Special tokens get ids
0..7 and are never produced by encoding plain text (a literal "<|bos|>" in user text stays ordinary bytes), so
chat markup cannot be injected through content. Exercised by `pytest tests/data/test_tokenizer.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from recurchat.errors import UserError
from recurchat.files import atomic_write_text

SPECIAL_TOKENS: list[str] = [
    "<|bos|>",
    "<|pad|>",
    "<|system_start|>",
    "<|system_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
]

# Below this many merges a "BPE" is just bytes; demanding a few keeps vocab_size typos (e.g. 26 for 256) loud.
MIN_MERGES = 16
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + MIN_MERGES


class Tokenizer:
    """A trained byte-level BPE plus the special-token ids the rest of recurchat relies on."""

    def __init__(self, hf: HFTokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer lacks recurchat special tokens: {', '.join(missing)}")
        # Not serialized by HF, so it is set on every construction path (train, from_file, from_str).
        hf.encode_special_tokens = True
        self._hf = hf
        self._special_ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self._token_bytes: list[int] | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE with `vocab_size` tokens (fewer if the text runs out of pairs to merge)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"vocab_size {vocab_size} is too small: minimum is {MIN_VOCAB_SIZE} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + {MIN_MERGES} merges)"
            )
        hf = HFTokenizer(models.BPE())
        # No normalizer and no prefix space: the token bytes are exactly the text's UTF-8 bytes (bits-per-byte).
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer saved by `save` (an HF tokenizer.json)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # HF raises a bare Exception with a multi-line serde message
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"corrupt tokenizer file {path}: {reason}") from e
        return cls(hf)

    @classmethod
    def from_str(cls, json_text: str) -> Tokenizer:
        """Build from the JSON text `to_str` returns (e.g. embedded in a checkpoint)."""
        try:
            hf = HFTokenizer.from_str(json_text)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"corrupt tokenizer json: {reason}") from e
        return cls(hf)

    def to_str(self) -> str:
        """The tokenizer as HF tokenizer.json text."""
        return self._hf.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically."""
        atomic_write_text(path, self.to_str())

    # ---- encoding -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; no special tokens are added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids for many texts at once, using HF's parallel batch path."""
        texts = list(texts)
        # encode_batch_fast skips offset tracking, which we never use; older tokenizers lack it.
        fast = getattr(self._hf, "encode_batch_fast", None) or self._hf.encode_batch
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`; special tokens are rendered as their literal strings."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    # ---- vocabulary ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (special tokens included); the embedding table needs this many rows."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    @property
    def pad_id(self) -> int:
        return self._special_ids["<|pad|>"]

    def special_ids(self) -> tuple[int, ...]:
        """Every special token's id: a chat reply ends at any of them (none is ever part of a reply's text)."""
        return tuple(self._special_ids[t] for t in SPECIAL_TOKENS)

    def special_id(self, name: str) -> int:
        """Id of a special token, by full form ("<|user_start|>") or bare name ("user_start")."""
        token = name if name.startswith("<|") else f"<|{name}|>"
        if token not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[token]

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte."""
        if self._token_bytes is None:
            specials = set(self._special_ids.values())
            # ByteLevel maps each byte to exactly one printable char, so a token's char count is its byte count.
            self._token_bytes = [
                0 if i in specials else len(self._hf.id_to_token(i)) for i in range(self.vocab_size)
            ]
        return torch.tensor(self._token_bytes, dtype=torch.int64)

    def fingerprint(self) -> str:
        """Short sha256 of the serialized tokenizer; equal fingerprints mean identical tokenization."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"
