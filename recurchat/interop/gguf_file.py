"""A GGUF file (llama.cpp's format) read into transformers' Llama naming: config, dequantized tensors, tokenizer.

    hf_config, tensors, tokenizer, meta = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

The `gguf` package (llama.cpp's own reader) parses the file and dequantizes every tensor type it implements (F32,
F16, BF16, Q4_0 … Q8_0, the K-quants, …) to fp32. llama.cpp's converter permutes the rows of q and k for its
interleaved rotary; `unpermute` undoes it so the heads rotate half-split, as transformers' Llama does. The tokenizer
is rebuilt as a `tokenizers` byte-level BPE from the file's vocabulary and merges, with the pre-tokenizer its
`tokenizer.ggml.pre` names (PRE_TOKENIZERS: the source tokenizer's split, e.g. SmolLM's single digits), its control
tokens special. Exercise: `pytest tests/interop/test_import.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from recurchat.errors import UserError

GPT2_SPLIT = None  # ByteLevel's own regex (GPT-2's)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre → (split digits one by one first, the split regex or None for GPT-2's)
PRE_TOKENIZERS = {"default": (False, GPT2_SPLIT), "gpt2": (False, GPT2_SPLIT), "smollm": (True, GPT2_SPLIT),
                  "llama-bpe": (False, LLAMA3_SPLIT), "llama3": (False, LLAMA3_SPLIT)}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
TENSOR_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k matrix from llama.cpp's interleaved-rotary order back to transformers' half-split order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{TENSOR_NAMES[parts[2]]}.{parts[3]}"
    raise UserError(f"unsupported GGUF tensor {name!r} (not part of a plain Llama model)")


def dequantized(tensor) -> torch.Tensor:
    from gguf.quants import dequantize
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {tensor.name}: unsupported quant type {tensor.tensor_type.name}") from None
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))  # writable, owned


def llama_hf_config(reader, vocab_size: int, tied: bool) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"unsupported GGUF architecture {arch!r}; recurchat imports llama")
    p = "llama."
    heads = int(field(reader, p + "attention.head_count"))
    d = int(field(reader, p + "embedding_length"))
    if int(field(reader, p + "rope.dimension_count", d // heads)) != d // heads:
        raise UserError("unsupported GGUF model: rotary covers part of each head (rope.dimension_count)")
    scaling = field(reader, p + "rope.scaling.type", "none")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_size": d, "intermediate_size": int(field(reader, p + "feed_forward_length")),
            "num_hidden_layers": int(field(reader, p + "block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(field(reader, p + "attention.head_count_kv", heads)),
            "rms_norm_eps": float(field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(field(reader, p + "rope.freq_base", 10000.0)),
            "rope_scaling": None if scaling == "none" else {"rope_type": scaling},
            "max_position_embeddings": int(field(reader, p + "context_length", 2048)), "tie_word_embeddings": tied}


def gguf_tokenizer(reader) -> tuple[HFTokenizer, list[str]]:
    """(byte-level BPE as in the source, the texts of its control tokens)."""
    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"unsupported GGUF tokenizer {kind!r}; recurchat imports byte-level BPE (gpt2)")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"unsupported GGUF pre-tokenizer {pre!r} (known: {', '.join(PRE_TOKENIZERS)})")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    digits, split = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    hf.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    hf.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return hf, control


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], HFTokenizer, dict]:
    """(transformers-style config dict, HF-named fp32 tensors, tokenizer, metadata: special tokens and template)."""
    from gguf import GGUFReader
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})") from None
    tensors = {hf_name(t.name): dequantized(t) for t in reader.tensors}
    tokenizer, control = gguf_tokenizer(reader)
    hf = llama_hf_config(reader, tokenizer.get_vocab_size(), "lm_head.weight" not in tensors)
    for i in range(hf["num_hidden_layers"]):
        for proj, heads in (("q", hf["num_attention_heads"]), ("k", hf["num_key_value_heads"])):
            name = f"model.layers.{i}.self_attn.{proj}_proj.weight"
            if name in tensors:
                tensors[name] = unpermute(tensors[name], heads)
    tokens = field(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str:
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        return "" if i is None else tokens[int(i)]

    meta = {"specials": control, "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
            "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
            "chat_template": field(reader, "tokenizer.chat_template", "")}
    return hf, tensors, tokenizer, meta
