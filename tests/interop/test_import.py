"""`recurchat import`: a tiny Llama saved by transformers, and the same model as a GGUF file, computed exactly.

Logits equal transformers' LlamaForCausalLM within 1e-4 in fp32, greedy continuations through recurchat's cached
engine equal transformers' token for token, the tokenizer round-trips as the source's does, chat rendering equals
the source's apply_chat_template, and inputs outside the family are one-line errors. Run:
`pytest tests/interop/test_import.py`.
"""

import json

import pytest
import torch
from interop_support import write_gguf

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.data.chat import render_conversation, render_prompt
from recurchat.interop.parity import compare

TEXTS = ["The capital of France is", "def f(x):\n    return x ** 2  # code\n", "  spaces\t\ttabs\r\nCRLF",
         "naïve café — “quotes” 12345 + 678", "<|im_start|> literal markup <|im_end|>", ""]


def test_logits_equal_transformers_within_1e_4_in_fp32(imported_llama):
    run, _, ref = imported_llama
    _, model = checkpoint.load_model(run, "cpu")
    x = torch.randint(0, ref.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert theirs.abs().max() > 1.0  # logits that mean something, so 1e-4 is a tight bound
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_generation_equals_transformers_token_for_token(imported_llama):
    run, folder, ref = imported_llama
    from transformers import AutoTokenizer
    results = compare(str(run), ref, AutoTokenizer.from_pretrained(folder), tokens=24)
    assert all(r.same_tokens and r.same_greedy for r in results), [(r.prompt, r.ours, r.theirs) for r in results]
    assert len({tuple(r.ours) for r in results}) > 1  # the prompts lead somewhere different


def test_tokenizer_round_trip_equals_the_source(imported_llama):
    run, folder, _ = imported_llama
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(folder)
    tok = checkpoint.load(run).tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids or "<|im_start|>" in text
        assert tok.decode(ids) == text
    # markup typed by a user is text, never a special token (the source would make it one)
    assert not set(tok.encode(TEXTS[4])) & set(tok.special_ids())


def test_chat_rendering_equals_the_source_template(imported_llama):
    run, folder, _ = imported_llama
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(folder)
    tok = checkpoint.load(run).tokenizer
    talk = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2 + 3?"}]
    for messages in (talk, [{"role": "system", "content": "Be brief."}, *talk]):
        assert render_prompt(tok, messages) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=True, return_dict=False)
    ids, mask = render_conversation(tok, talk[:2])
    assert ids == theirs.apply_chat_template(talk[:2], tokenize=True, return_dict=False)
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == "Hello!<|im_end|>\n"
    assert tok.special_id("assistant_end") == theirs.convert_tokens_to_ids("<|im_end|>")


def test_imported_run_is_a_standard_llama_family_checkpoint(imported_llama):
    run, _, ref = imported_llama
    ck = checkpoint.load(run)
    cfg = ck.model_cfg
    assert (cfg.n_prelude, cfg.n_shared, cfg.n_coda) == (4, 0, 0)
    assert (cfg.mlp, cfg.mlp_hidden, cfg.qk_norm, cfg.embed_norm, cfg.rope_convention, cfg.logit_softcap) == (
        "swiglu", 96, False, False, "llama", 0.0)
    assert cfg.tie_embeddings == ref.config.tie_word_embeddings == ("lm_head.weight" not in ck.weights)
    assert (run / "checkpoint" / "step-000000" / "chat_format.json").is_file()


@pytest.mark.parametrize("quant", ["Q8_0", "F16"])
def test_gguf_import_equals_transformers_gguf_load(tiny_llama, tmp_path, quant):
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, _ = tiny_llama
    gguf = tmp_path / f"tiny.{quant}.gguf"
    write_gguf(gguf, folder, quant)
    assert main(["import", "--from", f"gguf:{gguf}", "--out", str(tmp_path / "run")]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    results = compare(str(tmp_path / "run"), ref, AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name),
                      tokens=16)
    assert all(r.ok for r in results), [(r.prompt, r.ours, r.theirs) for r in results]
    assert max(r.max_logit_diff for r in results) < 1e-4
    source = AutoTokenizer.from_pretrained(folder)
    tok = checkpoint.load(tmp_path / "run").tokenizer
    assert all(tok.encode(t) == source(t, add_special_tokens=False).input_ids for t in TEXTS[:4])


def unknown_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                                    "model_type": "mistral"}))


def missing_tensor(folder):
    from safetensors.torch import load_file, save_file
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def pickled_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize("damage, message", [
    (unknown_architecture, "unsupported architecture 'MistralForCausalLM'"),
    (missing_tensor, "no tensor 'model.layers.1.mlp.up_proj.weight'"),
    (pickled_only, "pickled weights are never loaded"),
])
def test_sources_outside_the_family_are_one_line_errors(tiny_llama, tmp_path, capsys, damage, message):
    import shutil
    folder = tmp_path / "src"
    shutil.copytree(tiny_llama[0], folder)
    damage(folder)
    assert main(["import", "--from", f"hf:{folder}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unsupported_gguf_quant_type_is_named(tiny_llama, tmp_path, capsys, monkeypatch):
    import gguf.quants
    folder, _ = tiny_llama
    write_gguf(tmp_path / "q.gguf", folder, "Q8_0")

    real = gguf.quants.dequantize

    def refuse_q8_0(data, qtype):  # as for a quant type the installed gguf does not implement
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            raise NotImplementedError(qtype)
        return real(data, qtype)
    monkeypatch.setattr(gguf.quants, "dequantize", refuse_q8_0)
    assert main(["import", "--from", f"gguf:{tmp_path / 'q.gguf'}", "--out", str(tmp_path / "run")]) == 2
    assert "unsupported quant type Q8_0" in capsys.readouterr().err
