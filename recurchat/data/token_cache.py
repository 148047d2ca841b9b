"""On-disk token caches: `train.bin` / `val.bin` (flat uint16/uint32 token streams) plus `meta.json`.

Each document is written as [bos, *tokens]. meta.json is written last, so its presence (with matching file
sizes) marks a complete cache; a crashed build is simply rebuilt. Exercised by `pytest tests/data/test_corpus.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from recurchat.data.tokenizer import Tokenizer
from recurchat.files import atomic_open, atomic_write_text

CACHE_FORMAT = 1
SPLITS = ("train", "val")
# Text per encode_batch call: large enough to keep every core busy, small enough to bound memory on big data.
_CHUNK_CHARS = 8_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def load_token_cache(cache_dir: Path, fingerprint: str) -> tuple[dict, np.memmap, np.memmap] | None:
    """(meta, train, val) if `cache_dir` holds a complete cache for this tokenizer, else None."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("tokenizer_fingerprint") != fingerprint:
            return None
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for split in SPLITS:
            path, count = cache_dir / f"{split}.bin", int(meta[f"{split}_tokens"])
            if count <= 0 or path.stat().st_size != count * dtype.itemsize:
                return None
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(count,)))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: the caller rebuilds it
    return meta, arrays[0], arrays[1]


def build_token_cache(
    cache_dir: Path,
    tokenizer: Tokenizer,
    splits: dict[str, Sequence[str]],
    extra_meta: dict | None = None,
) -> dict:
    """Tokenize each split's documents into cache_dir/<split>.bin and write meta.json; returns the meta."""
    dtype = token_dtype(tokenizer.vocab_size)
    meta: dict = {"format": CACHE_FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                  "bos_id": tokenizer.bos_id, "tokenizer_fingerprint": tokenizer.fingerprint()}
    for split in SPLITS:
        docs = splits[split]
        count = 0
        with atomic_open(cache_dir / f"{split}.bin") as f:
            for chunk in _chunks(docs):
                arr = _flatten(tokenizer.encode_batch(chunk), tokenizer.bos_id, dtype)
                f.write(arr.tobytes())
                count += arr.size
        meta[f"{split}_tokens"] = count
        meta[f"{split}_docs"] = len(docs)
    meta.update(extra_meta or {})
    atomic_write_text(cache_dir / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def _chunks(docs: Sequence[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _flatten(encoded: list[list[int]], bos_id: int, dtype: np.dtype) -> np.ndarray:
    out = np.empty(sum(len(ids) + 1 for ids in encoded), dtype=dtype)
    pos = 0
    for ids in encoded:
        out[pos] = bos_id
        out[pos + 1 : pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return out
