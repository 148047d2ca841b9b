"""`recurchat import`: a Llama-family checkpoint as an ordinary standard recurchat run directory.

    recurchat import --from gguf:$(python -m recurchat.interop.smollm2) --out runs/smollm2
    recurchat import --from hf:path/to/llama-folder --out runs/llama

The run directory holds one step (checkpoint/step-000000) like any trained run: the source's weights in fp32
(dequantized for GGUF) mapped by interop/llama.py, its tokenizer as tokenizer.json, and its chat template mapped
onto recurchat's chat rendering as chat_format.json (interop/chat_template.py). A source without a chat template
gets ChatML. Every command that takes --ckpt then runs it: sample, chat, serve, eval, lm-eval, export hf, retrofit.
Exercise: `pytest tests/interop/test_import.py`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from recurchat import checkpoint
from recurchat.config import TrainConfig
from recurchat.data.tokenizer import ChatFormat, Tokenizer
from recurchat.errors import UserError
from recurchat.interop.chat_template import chat_format
from recurchat.interop.gguf_file import read_gguf
from recurchat.interop.hf_folder import read_hf_folder
from recurchat.interop.llama import llama_to_recurchat
from recurchat.model.recurrent import RecurrentLM

SOURCES = ("hf", "gguf")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def read_source(spec: str):
    kind, _, where = spec.partition(":")
    if kind not in SOURCES or not where:
        raise UserError(f"--from {spec!r}: expected hf:DIR or gguf:FILE")
    return read_hf_folder(where) if kind == "hf" else read_gguf(where)


def source_chat_format(hf: HFTokenizer, meta: dict) -> ChatFormat:
    """The source's chat markup. BOS: the source's own if it adds one to every text, else its end-of-text token
    (which separates documents in its pretraining stream), else its EOS."""
    vocab = hf.get_vocab()
    bos = meta["bos_token"] if meta["add_bos_token"] and meta["bos_token"] else next(
        (t for t in ("<|endoftext|>", "<|end_of_text|>", meta["eos_token"]) if t and t in vocab), "")
    pad = next((t for t in (meta["pad_token"], meta["eos_token"], bos) if t and t in vocab), bos)
    if not bos:
        raise UserError("the source names no BOS, end-of-text or EOS token that is in its vocabulary")
    template = meta["chat_template"] or CHATML
    return chat_format(template, meta["specials"], bos, pad, meta["bos_token"], meta["eos_token"])


def import_model(spec: str, out: str | Path, seq_len: int = 0) -> Path:
    """Write run directory `out` from source `spec`; returns the step directory."""
    out = Path(out)
    if checkpoint.find(out) is not None:
        raise UserError(f"{out} already holds a checkpoint; choose a new --out")
    hf_config, tensors, hf_tok, meta = read_source(spec)
    weights, cfg = llama_to_recurchat(tensors, hf_config, seq_len)
    tokenizer = Tokenizer(hf_tok, source_chat_format(hf_tok, meta))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding {cfg.vocab_size}")
    model = RecurrentLM(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"mapped weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    train = TrainConfig(max_steps=1, batch_size=1, total_batch_tokens=cfg.seq_len)
    return checkpoint.save_step(out / "checkpoint", 0, model, cfg, train, tokenizer, keep=1)
