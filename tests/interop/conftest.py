"""Fixtures: a trained byte-level BPE with ChatML markup, a random tiny Llama saved by transformers (tied and
untied), and its import. Run: `pytest tests/interop`."""

import pytest
from interop_support import CHATML_TEMPLATE, SPECIALS, save_tiny_llama

@pytest.fixture(scope="session")
def llama_tokenizer(small_text):
    """transformers' fast tokenizer over a byte-level BPE trained here, with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([small_text.read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def tiny_llama(request, tmp_path_factory, llama_tokenizer):
    """(folder, LlamaForCausalLM) of a random 4-layer Llama, tied and untied."""
    folder = tmp_path_factory.mktemp("llama")
    return folder, save_tiny_llama(folder, llama_tokenizer, request.param)


@pytest.fixture(scope="session")
def imported_llama(tiny_llama, tmp_path_factory):
    """(run directory of `recurchat import --from hf:…`, the source folder, the source model)."""
    from recurchat.cli import main

    folder, model = tiny_llama
    run = tmp_path_factory.mktemp("imported") / "run"
    assert main(["import", "--from", f"hf:{folder}", "--out", str(run)]) == 0
    return run, folder, model


