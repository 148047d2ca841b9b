"""Byte-level BPE tokenizer (HF `tokenizers`) with recurchat's reserved special tokens, or an imported one.

Every byte is in the base alphabet, so any text encodes and decode(encode(s)) == s. Special tokens get ids
0..7 and are never produced by encoding plain text (a literal "<|bos|>" in user text stays ordinary bytes), so
chat markup cannot be injected through content. A tokenizer imported with a pretrained model (interop/) keeps the
source's vocabulary and its chat markup instead: a ChatFormat says how it spells recurchat's reserved names (ChatML's
"<|im_start|>user\n" for user_start, and so on), and the same rules hold for it.
Exercised by `pytest tests/data/test_tokenizer.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
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


ROLE_MARKERS = tuple(t[2:-2] for t in SPECIAL_TOKENS[2:])  # system_start … assistant_end


@dataclass(frozen=True)
class ChatFormat:
    """How an imported tokenizer spells recurchat's reserved names in its source's own markup.

    `bos` is the one token every document and prompt starts with (the source's BOS; for a source that adds none, its
    end-of-text token, which separates documents in its pretraining stream); `pad` one more of its tokens.
    `markers` maps each of ROLE_MARKERS to a text in the source's chat template, which may hold its special tokens
    (ChatML: user_start = "<|im_start|>user\n", user_end = "<|im_end|>\n"). `chat_bos`: a rendered conversation
    starts with `bos` (only where the template itself writes it). `default_system`: the system message the template
    adds when a conversation has none ("" = none). interop/chat_template.py derives one from a Jinja template.
    """

    bos: str
    pad: str
    markers: dict[str, str] = field(default_factory=dict)
    chat_bos: bool = False
    default_system: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "chat format") -> "ChatFormat":
        try:
            found = cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{where} is not a chat format ({e})") from None
        missing = [m for m in ROLE_MARKERS if not isinstance(found.markers.get(m), str)]
        if missing:
            raise UserError(f"{where} has no text for {', '.join(missing)}")
        return found


class Tokenizer:
    """A trained byte-level BPE plus the special-token ids the rest of recurchat relies on; with `chat_format`, an
    imported byte-level BPE whose reserved names are spelled in its source's markup."""

    def __init__(self, hf: HFTokenizer, chat_format: ChatFormat | None = None) -> None:
        self.chat_format = chat_format
        if chat_format is None:
            missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
            if missing:
                raise UserError(f"tokenizer lacks recurchat special tokens: {', '.join(missing)}")
            self._special_ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
            self._markers = {m: [self._special_ids[f"<|{m}|>"]] for m in ROLE_MARKERS}
            self._stops = tuple(self._special_ids.values())
        else:
            self._markers, self._special_ids, self._stops = _imported_ids(hf, chat_format)
        # Not serialized by HF, so it is set on every construction path (train, from_file, from_str).
        hf.encode_special_tokens = True
        self._hf = hf
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
    def from_file(cls, path: str | Path, chat_format: ChatFormat | None = None) -> Tokenizer:
        """Load a tokenizer saved by `save` (an HF tokenizer.json); an imported one with its chat format."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # HF raises a bare Exception with a multi-line serde message
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"corrupt tokenizer file {path}: {reason}") from e
        return cls(hf, chat_format)

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
        """Every special token's id: a chat reply ends at any of them (none is ever part of a reply's text). For an
        imported tokenizer: every token its source marks special (ChatML's <|im_end|>, <|im_start|>, …)."""
        return self._stops

    def special_id(self, name: str) -> int:
        """Id of a special token, by full form ("<|user_start|>") or bare name ("user_start"); for an imported
        tokenizer, the token a marker opens with (assistant_end → <|im_end|>, where a reply stops)."""
        token = name if name.startswith("<|") else f"<|{name}|>"
        if token not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[token]

    def marker(self, name: str) -> list[int]:
        """Ids of a role marker (ROLE_MARKERS: "user_start", …): one reserved token, or the source's markup."""
        if name not in self._markers:
            raise ValueError(f"unknown role marker {name!r}; known: {', '.join(ROLE_MARKERS)}")
        return list(self._markers[name])

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte."""
        if self._token_bytes is None:
            specials = set(self._stops)
            # ByteLevel maps each byte to exactly one printable char, so a token's char count is its byte count.
            self._token_bytes = [
                0 if i in specials else len(self._hf.id_to_token(i)) for i in range(self.vocab_size)
            ]
        return torch.tensor(self._token_bytes, dtype=torch.int64)

    def fingerprint(self) -> str:
        """Short sha256 of the serialized tokenizer (and chat format); equal fingerprints mean identical
        tokenization."""
        text = self.to_str() + ("" if self.chat_format is None else self.chat_format.to_json())
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


def _imported_ids(hf: HFTokenizer, fmt: ChatFormat) -> tuple[dict[str, list[int]], dict[str, int], tuple[int, ...]]:
    """(marker ids, reserved name → the id it opens with, stop ids) of an imported tokenizer. Markers are encoded with
    the source's special tokens recognised; content never is (Tokenizer sets encode_special_tokens afterwards)."""
    for what, token in (("bos", fmt.bos), ("pad", fmt.pad)):
        if hf.token_to_id(token) is None:
            raise UserError(f"chat format: its {what} token {token!r} is not in the tokenizer's vocabulary")
    hf.encode_special_tokens = False
    markers = {m: hf.encode(fmt.markers[m], add_special_tokens=False).ids for m in ROLE_MARKERS}
    empty = [m for m, ids in markers.items() if not ids]
    if empty:
        raise UserError(f"chat format: {empty[0]} is empty (every role marker needs at least one token)")
    reserved = {"<|bos|>": hf.token_to_id(fmt.bos), "<|pad|>": hf.token_to_id(fmt.pad),
                **{f"<|{m}|>": ids[0] for m, ids in markers.items()}}
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    stops = tuple(sorted(special | {reserved["<|bos|>"], reserved["<|assistant_end|>"]}))
    return markers, reserved, stops
