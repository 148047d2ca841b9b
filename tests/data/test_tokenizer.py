"""Byte-level BPE: lossless roundtrip, special tokens, byte accounting, persistence, bad inputs.

Run: `pytest tests/data/test_tokenizer.py`.
"""

from __future__ import annotations

import pytest
import torch

from recurchat.data.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer
from recurchat.errors import UserError

SMALL_VOCAB = 512  # matches the small_tokenizer fixture in conftest.py

SAMPLES = [
    "",
    "plain ascii text, with punctuation!",
    "  leading spaces\n\n\ttabs\r\nand CRLF  ",
    "naïve café Grüße — “quotes” ‘single’ …",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤗🚀👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽",
    "rare: \x00\x01\x7f \u200b zero-width, \U0001d54f math-bold, \ufeff BOM",
    "def f(x):\n    return x ** 2  # code\n",
    "<|bos|> literal <|assistant_end|> markup <|pad|>",
]


def test_train_gives_requested_vocab_and_reserved_ids(small_tokenizer):
    assert small_tokenizer.vocab_size == SMALL_VOCAB
    ids = [small_tokenizer.special_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert small_tokenizer.bos_id == small_tokenizer.special_id("bos") == ids[0]
    assert small_tokenizer.special_id("assistant_end") == small_tokenizer.special_id("<|assistant_end|>")
    with pytest.raises(ValueError):
        small_tokenizer.special_id("nope")


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_is_lossless(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_specials_are_single_ids_and_never_come_from_plain_text(small_tokenizer):
    specials = {small_tokenizer.special_id(t) for t in SPECIAL_TOKENS}
    for token in SPECIAL_TOKENS:
        assert small_tokenizer.decode([small_tokenizer.special_id(token)]) == token
    for text in SAMPLES:
        assert not specials & set(small_tokenizer.encode(text))


def test_encode_batch_matches_encode(small_tokenizer):
    assert small_tokenizer.encode_batch(SAMPLES) == [small_tokenizer.encode(t) for t in SAMPLES]


def test_merges_compress_trained_text(small_tokenizer, small_texts):
    text = small_texts[0]
    assert len(small_tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_token_bytes_account_for_every_byte(small_tokenizer, small_texts):
    tb = small_tokenizer.token_bytes()
    assert tb.dtype == torch.int64 and tb.shape == (small_tokenizer.vocab_size,)
    assert all(tb[small_tokenizer.special_id(t)] == 0 for t in SPECIAL_TOKENS)
    assert bool((tb[len(SPECIAL_TOKENS):] >= 1).all())
    for text in SAMPLES + small_texts[:3]:
        assert int(tb[small_tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))


def test_save_load_is_identical(small_tokenizer, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    small_tokenizer.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.fingerprint() == small_tokenizer.fingerprint()
    assert loaded.vocab_size == small_tokenizer.vocab_size
    for text in SAMPLES:
        assert loaded.encode(text) == small_tokenizer.encode(text)
    # encode_special_tokens is not serialized by HF: make sure the loaded copy still ignores literal markup.
    assert loaded.encode("<|bos|>") == small_tokenizer.encode("<|bos|>")
    assert Tokenizer.from_str(small_tokenizer.to_str()).fingerprint() == small_tokenizer.fingerprint()


def test_training_is_deterministic(small_texts, small_tokenizer):
    assert Tokenizer.train(small_texts, SMALL_VOCAB).fingerprint() == small_tokenizer.fingerprint()


def test_too_small_vocab_names_the_minimum(small_texts):
    with pytest.raises(UserError, match=str(MIN_VOCAB_SIZE)):
        Tokenizer.train(small_texts, 256)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_file(tmp_path / "absent.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match="corrupt tokenizer file"):
        Tokenizer.from_file(corrupt)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xff not json")
    with pytest.raises(UserError, match="corrupt tokenizer file") as err:
        Tokenizer.from_file(garbage)
    assert "\n" not in str(err.value)
