"""Fixtures for the data tests: a small real text and a real 512-token BPE trained on it once per session.

Run: `pytest tests/data`.
"""

from __future__ import annotations

from pydoc_data.topics import topics

import pytest

from recurchat.data.tokenizer import Tokenizer

SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def small_texts() -> list[str]:
    """~120 KB of real English/technical prose (Python reference topics), plus some non-ASCII lines."""
    texts = [topics[name] for name in sorted(topics)[:25]]
    texts.append("Ünïcödé prose: naïve café, Grüße, 日本語のテキスト, русский текст, emoji 🤗🚀 and math ∑∫√.\n")
    return texts


@pytest.fixture(scope="session")
def small_tokenizer(small_texts) -> Tokenizer:
    return Tokenizer.train(small_texts, SMALL_VOCAB)
