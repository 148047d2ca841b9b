"""The fixed train/validation split: deterministic, disjoint, never empty.

Many documents: every k-th document (k = 1/val_fraction) is held out, so validation samples every source in
the corpus. Too few documents for that (a single .txt file): the last val_fraction of each document's text, cut
at a line boundary, is held out instead. Exercised by `pytest tests/data/test_corpus.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from recurchat.errors import UserError


def split_documents(docs: Sequence[str], val_fraction: float = 0.02) -> tuple[list[str], list[str]]:
    """(train, val) documents; same input, same split, with no text in both."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    # Exact duplicates would otherwise land on both sides and flatter the validation loss.
    docs = list(dict.fromkeys(d for d in docs if d.strip()))
    if not docs:
        raise UserError("no documents to split into train/validation (data is empty)")
    every = max(2, round(1.0 / val_fraction))
    if len(docs) >= every:
        train = [d for i, d in enumerate(docs) if i % every != every - 1]
        val = docs[every - 1 :: every]
        return train, val

    train, val = [], []
    for doc in docs:
        head, tail = split_text(doc, val_fraction)
        train.append(head)
        if tail:
            val.append(tail)
    if not val:
        if len(docs) < 2:
            raise UserError(
                f"data too small to hold out a validation split ({len(docs[0])} characters in one document)"
            )
        # Every document is a single short line: fall back to holding out the last whole document.
        train, val = docs[:-1], docs[-1:]
    return train, val


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(head, tail) with tail ≈ the last val_fraction of `text`, cut at a newline (else a space) near there.

    head + tail == text. tail is "" when the text can't be cut into two non-blank parts.
    """
    n = len(text)
    target = int(n * (1.0 - val_fraction))
    # Accept a boundary that leaves between half and twice the requested fraction in the tail; a newline far
    # outside that window would silently turn a 2% split into a 40% one.
    lo, hi = int(n * (1.0 - 2 * val_fraction)), int(n * (1.0 - val_fraction / 2))
    for sep in ("\n", " "):
        before, after = text.rfind(sep, lo, target), text.find(sep, target, hi)
        cuts = sorted((i + 1 for i in (before, after) if i != -1), key=lambda c: abs(c - target))
        for cut in cuts:
            if text[:cut].strip() and text[cut:].strip():
                return text[:cut], text[cut:]
    if 0 < target < n and text[:target].strip() and text[target:].strip():
        return text[:target], text[target:]
    return text, ""
