"""The model card (README.md) of an exported folder: what the model is, what it costs, how well it predicts text at
each depth, and how to choose the depth — every figure computed at export time from the checkpoint.

Written by `recurchat export hf` (interop/hf_export.py). Exercised by `pytest tests/test_export_hf.py`.
"""

from __future__ import annotations

import sys

from recurchat import checkpoint
from recurchat.data.corpus import prepare_data
from recurchat.eval.bpb import evaluate_bpb
from recurchat.eval.evaluate import heldout_source
from recurchat.model.flops import flops_per_token
from recurchat.model.recurrent import RecurrentLM


def depths_of(cfg) -> list[int]:
    return sorted({1, cfg.mean_recur, 2 * cfg.mean_recur}) if cfg.recursive else [1]


def bpb_rows(loaded: checkpoint.Checkpoint, model: RecurrentLM, eval_tokens: int) -> list[str]:
    cfg = model.cfg
    rows = ["| r | inference FLOPs/token | held-out bpb |", "|---:|---:|---:|"]
    val = None
    if eval_tokens:
        val = prepare_data(heldout_source(loaded, None), cfg.vocab_size, tokenizer=loaded.tokenizer,
                           log=lambda *a, **k: print(*a, file=sys.stderr, **k)).val
    for r in depths_of(cfg):
        bpb = evaluate_bpb(model, val, loaded.tokenizer.token_bytes(), 8, cfg.seq_len, eval_tokens, num_recur=r) \
            if val is not None else None
        rows.append(f"| {r} | {flops_per_token(cfg, r, backward=False) / 1e6:.2f} M | "
                    + (f"{bpb:.4f} |" if bpb is not None else "not measured |"))
    return rows


def model_card(loaded: checkpoint.Checkpoint, model: RecurrentLM, eval_tokens: int, log=print) -> str:
    cfg, params = model.cfg, model.num_params()
    calibrated = checkpoint.calibrated_exit(loaded.path)
    shape = (f"a prelude of {cfg.n_prelude} blocks run once, {cfg.n_shared} shared blocks run r times (r̄ = "
             f"{cfg.mean_recur} in training, up to r_max = {cfg.r_max}), a coda of {cfg.n_coda} blocks"
             if cfg.recursive else f"a standard transformer of {cfg.n_prelude + cfg.n_coda} blocks")
    log(f"model card: measuring held-out bpb at r = {depths_of(cfg)} on {eval_tokens} tokens")
    run = loaded.path.parent.parent if loaded.path.parent.name == "checkpoint" else loaded.path
    lines = [
        "---", "library_name: transformers", "tags: [recurchat, recursive, looped-transformer, adaptive-compute]",
        "---", "", f"# {run.name}",
        "", f"A recursive (depth-recurrent) language model trained with recurchat: {shape}; "
        f"d_model {cfg.d_model}, {cfg.n_head} heads ({cfg.n_kv_head} KV), context {cfg.seq_len}, vocabulary "
        f"{cfg.vocab_size}. {params['total']:,} parameters ({params['recur']:,} in the shared blocks).", "",
        "## Depth, cost and quality", "", *bpb_rows(loaded, model, eval_tokens), "",
        f"bpb: bits per UTF-8 byte on {eval_tokens} held-out tokens of the text it was trained on.", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        "tok = AutoTokenizer.from_pretrained(FOLDER)           # BOS is put first, as in training",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)",
        "ids = tok(\"In the beginning\", return_tensors=\"pt\").input_ids",
        f"model(ids, num_recur={cfg.mean_recur}).logits                      # any depth r, per call",
        f"model.generate(ids, max_new_tokens=40, num_recur={2 * cfg.mean_recur})        # cached decoding at depth r",
        f"model.generate(ids, max_new_tokens=40, exit=\"{calibrated or 'kl:1e-3'}\", max_recur={cfg.r_max})"
        "   # per-token early exit",
        "model.generate(ids, max_new_tokens=40, num_recur=4, kv=\"last\")   # one KV slot per shared layer", "```",
        "", "Exit criteria: kl:T, entropy:T, latent:T, cosine:T, argmax:N, fixed:R (see recurchat's infer/exit.py). "
        "Batches must be unpadded (prompts of equal length). The code is recurchat's own, copied into "
        "modeling_recurchat.py at export, so it does not change when transformers' cache classes do.",
    ]
    if calibrated:
        lines += ["", f"Calibrated exit (recurchat calibrate): `{calibrated}`."]
    return "\n".join(lines) + "\n"
