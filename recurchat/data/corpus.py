"""Text in, token streams out: `prepare_data` is the one call the trainer makes.

It picks the corpus (embedded default or the user's files), splits off validation, trains (or reuses) the
tokenizer and tokenizes once into memmapped caches under $RECURCHAT_HOME; later calls reuse both caches.
The embedded corpus, the file readers and the split live in their own modules and are re-exported here.
Exercised by `pytest tests/data/test_corpus.py`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recurchat.data.embedded import EMBEDDED_DESCRIPTION, CorpusSize, embedded_documents, embedded_size
from recurchat.data.readers import data_identity, read_documents
from recurchat.data.split import split_documents
from recurchat.data.token_cache import CACHE_FORMAT, build_token_cache, load_token_cache
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.files import recurchat_home

__all__ = [
    "EMBEDDED_DESCRIPTION",
    "CorpusSize",
    "PreparedData",
    "embedded_documents",
    "embedded_size",
    "prepare_data",
    "read_documents",
    "recurchat_home",
    "split_documents",
]

# Part of every cache key: bump when the split or the tokenizer recipe changes so stale caches are not reused.
RECIPE = {"split": "every-k/tail-v1", "val_fraction": 0.02, "tokenizer": "bytelevel-bpe-v1"}


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: np.ndarray  # read-only memmap, documents as [bos, *tokens] back to back
    val: np.ndarray
    cache_dir: Path


def prepare_data(
    data: str | Path | None,
    vocab_size: int | None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
    *,
    tokenizer: Tokenizer | None = None,
) -> PreparedData:
    """Tokenizer + train/val token memmaps for `data` (None = the embedded corpus), built once and cached.

    With `tokenizer` given, no tokenizer is trained and `vocab_size` may be None (SFT/eval reuse a checkpoint's).
    """
    home = Path(home) if home is not None else recurchat_home()
    source = _Source(data)

    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("prepare_data needs vocab_size or an existing tokenizer")
        tokenizer = _tokenizer_for(source, vocab_size, home, log)

    fingerprint = tokenizer.fingerprint()
    cache_dir = home / "tokens" / _key({"data": source.identity, "tokenizer": fingerprint,
                                        "recipe": RECIPE, "format": CACHE_FORMAT})
    cached = load_token_cache(cache_dir, fingerprint)
    if cached is not None:
        meta = cached[0]
        log(f"reusing token cache {cache_dir} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
    else:
        train_docs, val_docs = source.split()
        start = time.perf_counter()
        meta = build_token_cache(cache_dir, tokenizer, {"train": train_docs, "val": val_docs},
                                 extra_meta={"data": source.describe})
        log(f"tokenized {source.describe} in {time.perf_counter() - start:.1f}s: {meta['train_tokens']:,} train / "
            f"{meta['val_tokens']:,} val tokens ({meta['dtype']}) -> {cache_dir}")
        cached = load_token_cache(cache_dir, fingerprint)
        if cached is None:
            raise RuntimeError(f"token cache {cache_dir} unreadable right after writing it")
    _, train, val = cached
    return PreparedData(tokenizer=tokenizer, train=train, val=val, cache_dir=cache_dir)


def _tokenizer_for(source: _Source, vocab_size: int, home: Path, log: Callable[[str], None]) -> Tokenizer:
    path = home / "tokenizers" / f"{_key({'data': source.identity, 'vocab_size': vocab_size, 'recipe': RECIPE})}.json"
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(path)
            log(f"reusing tokenizer {path} (vocab {tokenizer.vocab_size:,})")
            return tokenizer
        except UserError as e:
            log(f"retraining: cached {e}")  # our own cache file got damaged; not the user's fault
    train_docs, _ = source.split()
    start = time.perf_counter()
    tokenizer = Tokenizer.train(train_docs, vocab_size)
    tokenizer.save(path)
    log(f"trained tokenizer (vocab {tokenizer.vocab_size:,}) on {source.describe} "
        f"in {time.perf_counter() - start:.1f}s -> {path}")
    if tokenizer.vocab_size < vocab_size:
        log(f"note: the text only supports {tokenizer.vocab_size:,} tokens, fewer than the {vocab_size:,} asked for")
    return tokenizer


class _Source:
    """The corpus behind `data`: a cheap identity for cache keys, documents read only when a cache is built."""

    def __init__(self, data: str | Path | None) -> None:
        self._data = data
        self._split: tuple[list[str], list[str]] | None = None
        if data is None:
            # Content hash, not a version string: the stdlib docstrings vary with the exact Python build.
            digest = hashlib.sha256()
            for doc in embedded_documents():
                digest.update(doc.encode("utf-8") + b"\0")
            self.identity: dict = {"embedded": digest.hexdigest()}
            self.describe = "the embedded corpus"
        else:
            self.identity = data_identity(data)
            self.describe = self.identity["path"]

    def split(self) -> tuple[list[str], list[str]]:
        if self._split is None:
            docs = embedded_documents() if self._data is None else read_documents(self._data)
            self._split = split_documents(docs, RECIPE["val_fraction"])
        return self._split


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]
