"""A Llama-family model (transformers' LlamaForCausalLM naming) as recurchat weights and a ModelConfig.

    weights, cfg = llama_to_recurchat(hf_tensors, hf_config)     # hf_config: transformers' config.json as a dict

The source's L layers become a standard model's prelude (n_shared = 0) of Llama-family blocks: SwiGLU with the
source's hidden size (gate and up stacked into one c_fc), no QK-norm, its norm epsilon, no embedding norm, no logit
soft-cap, rotary pairs rotated by +θ with its base. RMSNorm gains are folded into the linear that reads the
normalised vector, which is exact: W·(g ⊙ n(x)) = (W·diag(g))·n(x) — the attention norm into q, k and v, the MLP
norm into gate and up, and the final norm into an untied lm_head. A tied head is also the input embedding, so it
cannot absorb the final gain; that one stays a learned parameter (final_norm_gain). Everything outside this family
(attention or MLP biases, rope scaling, a head size other than d/heads) is a one-line error naming it.
Exercise: `pytest tests/interop/test_import.py`.
"""

from __future__ import annotations

import torch

from recurchat.config import ModelConfig
from recurchat.errors import UserError

ARCHITECTURES = ("LlamaForCausalLM",)
LAYER = "model.layers.{i}."


def llama_config(hf: dict, seq_len: int = 0) -> ModelConfig:
    """ModelConfig of the standard recurchat model that computes what `hf` (a Llama config.json) describes."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES or hf.get("model_type", "llama") != "llama":
        raise UserError(f"unsupported architecture {arch!r} (model_type {hf.get('model_type')!r}); "
                        f"recurchat imports {', '.join(ARCHITECTURES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise UserError(f"unsupported Llama variant: {flag} is true (recurchat's blocks have no biases)")
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}  # transformers 4 | 5 naming
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"unsupported rope scaling {rope} (recurchat computes plain RoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported activation {hf['hidden_act']!r} (Llama's SwiGLU uses silu)")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, d // heads):
        raise UserError(f"unsupported head_dim {hf['head_dim']} (recurchat uses hidden_size / heads = {d // heads})")
    theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=d, n_head=heads,
        n_kv_head=int(hf.get("num_key_value_heads") or heads), n_prelude=int(hf["num_hidden_layers"]), n_shared=0,
        n_coda=0, mean_recur=1, r_max=1, seq_len=int(seq_len or hf.get("max_position_embeddings", 2048)),
        logit_softcap=0.0, rope_base=float(theta), mlp="swiglu", mlp_hidden=int(hf["intermediate_size"]),
        qk_norm=False, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), embed_norm=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        final_norm_gain=bool(hf.get("tie_word_embeddings", False)), rope_convention="llama").validate()


def take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"the checkpoint has no tensor {name!r}")
    return tensors[name].float()


def layer_weights(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """One source layer as a recurchat block's weights (names relative to the block), its two gains folded."""
    at = LAYER.format(i=i)
    g_attn, g_mlp = take(tensors, at + "input_layernorm.weight"), take(tensors, at + "post_attention_layernorm.weight")
    attn = {f"attn.c_{p}.weight": take(tensors, f"{at}self_attn.{p}_proj.weight") * g_attn for p in "qkv"}
    gate, up = take(tensors, at + "mlp.gate_proj.weight"), take(tensors, at + "mlp.up_proj.weight")
    return {**attn, "attn.c_proj.weight": take(tensors, at + "self_attn.o_proj.weight"),
            "mlp.c_fc.weight": torch.cat((gate, up)) * g_mlp,
            "mlp.c_proj.weight": take(tensors, at + "mlp.down_proj.weight")}


def llama_to_recurchat(tensors: dict[str, torch.Tensor], hf: dict,
                       seq_len: int = 0) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(recurchat state dict in fp32, ModelConfig) for a Llama model's tensors and config.json."""
    cfg = llama_config(hf, seq_len)
    out = {"embed.weight": take(tensors, "model.embed_tokens.weight")}
    for i in range(cfg.n_prelude):
        out.update({f"prelude.{i}.{k}": v for k, v in layer_weights(tensors, i).items()})
    g_final = take(tensors, "model.norm.weight")
    if cfg.tie_embeddings:
        out["final_gain"] = g_final
    else:
        out["lm_head.weight"] = take(tensors, "lm_head.weight") * g_final
    if out["embed.weight"].shape != (cfg.vocab_size, cfg.d_model):
        raise UserError(f"model.embed_tokens.weight is {tuple(out['embed.weight'].shape)}, the config says "
                        f"({cfg.vocab_size}, {cfg.d_model})")
    return out, cfg
