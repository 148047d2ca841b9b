"""Helpers for tests/interop: a random tiny Llama saved by transformers and the same model written as a GGUF file
(F32 norms, Q8_0 or F16 matrices, q/k rows permuted as llama.cpp's converter does). Used by `pytest tests/interop`."""

import numpy as np
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_tiny_llama(folder, tokenizer, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=50000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # gains away from 1, so folding them is tested; weights wide enough for varied text
        for name, p in model.named_parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) * 0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def write_gguf(path, folder, quant: str = "Q8_0") -> None:
    """The transformers folder as llama.cpp's converter would write it (a small subset of its metadata)."""
    import json

    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    w = GGUFWriter(str(path), "llama")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in load_file(str(folder / "model.safetensors")).items():
        if name not in names:
            i, part = name.split(".")[2], ".".join(name.split(".")[3:-1])
            names[name] = f"blk.{i}.{parts[part]}.weight"
        a = t.float().numpy()
        if "q_proj" in name or "k_proj" in name:  # llama.cpp's permutation for its interleaved rotary
            n = heads if "q_proj" in name else kv
            a = a.reshape(n, 2, a.shape[0] // n // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 1:
            w.add_tensor(names[name], a.astype(np.float32))
        elif quant == "F16":
            w.add_tensor(names[name], a.astype(np.float16))
        else:
            qtype = GGMLQuantizationType[quant]
            w.add_tensor(names[name], quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
