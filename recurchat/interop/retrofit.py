"""`recurchat retrofit`: layer surgery that turns a standard checkpoint into a recursive one, healed by `train`.

    recurchat retrofit --ckpt runs/smollm2 --out runs/smollm2-retro          # McLeish's proportions (below)
    recurchat retrofit --ckpt runs/smollm2 --prelude 0-3 --shared 10-17 --coda 26-29 --out runs/retro
    recurchat retrofit --ckpt runs/smollm2 --standard iso-params --out runs/retro-std   # the control: no loop
    recurchat train --init-from runs/smollm2-retro --out runs/smollm2-healed --max-steps 300

The source's blocks A-B become the prelude, C-D the shared recurrent stack, E-F the coda; every other block is
dropped. Defaults follow McLeish et al.'s TinyLlama recipe (arXiv 2511.07384: 22 layers → prelude 0-3, recurrent
10-17, coda 18-21, i.e. the first 4/22 and last 4/22 of the layers, and the 8/22 just before the coda), scaled to
the source's depth. The adapter is concat with init `s` ([0 | I]) and the state starts at e, so at r = 1 the
recursive model computes exactly the kept layers once — the iso-params control's function — and healing starts from
the pretrained model, not from noise; each further iteration applies the shared slice to its own output (layer
repetition, which a pretrained residual stream tolerates), and the adapter learns to mix e back in. The state norm is
off: a pretrained residual stream's scale carries information. The written TrainConfig is a heal: McLeish's rates
(Muon 1e-3; AdamW 5e-5 for embeddings, head and gains), r̄ ramped from 1 over the first quarter, truncated BPTT
through the last 8 iterations. Exercise: `pytest tests/interop/test_retrofit.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from recurchat import checkpoint
from recurchat.config import ModelConfig, TrainConfig
from recurchat.errors import UserError
from recurchat.model.recurrent import RecurrentLM

HEAL = dict(lr_matrix=1e-3, lr_embed=5e-5, lr_head=5e-5, lr_scalar=5e-5, curriculum_frac=0.25, bptt_k=8,
            warmup_steps=10, warmdown_frac=0.3, recur_dist="poisson-lognormal", eval_every=50, save_every_min=10.0,
            batch_size=4, stop_after=0, stage="pretrain", data="")
HEAL_SEQ_LEN = 512  # a CPU heal's windows (the paper: 1024); override with --seq-len


def parse_span(text: str, what: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected A-B (block indices, inclusive)") from None
    if not 0 <= lo <= hi:
        raise UserError(f"--{what} {text!r}: need 0 <= A <= B")
    return lo, hi


def default_spans(layers: int) -> dict[str, tuple[int, int]]:
    """McLeish's TinyLlama split (4 | 8 | 4 of 22) scaled to `layers`: prelude first, shared just before the coda."""
    edge, shared = max(1, round(layers * 4 / 22)), max(1, round(layers * 8 / 22))
    return {"prelude": (0, edge - 1), "shared": (layers - edge - shared, layers - edge - 1),
            "coda": (layers - edge, layers - 1)}


def check_spans(spans: dict[str, tuple[int, int]], layers: int) -> None:
    order = [spans[k] for k in ("prelude", "shared", "coda")]
    if order[-1][1] >= layers:
        raise UserError(f"the source has blocks 0-{layers - 1}; --coda ends at {order[-1][1]}")
    if any(a[1] >= b[0] for a, b in zip(order, order[1:])):
        raise UserError(f"--prelude, --shared and --coda must be in order and disjoint, got {spans}")


def surgery(weights: dict[str, torch.Tensor], spans: dict[str, tuple[int, int]], loop: bool) -> dict:
    """The kept blocks renamed into prelude / recur / coda (or all into prelude, without the loop)."""
    out = {k: v for k, v in weights.items() if not k.startswith("prelude.")}
    parts = ("prelude", "recur", "coda") if loop else ("prelude", "prelude", "prelude")
    counters: dict[str, int] = {}
    for part, span in zip(parts, (spans["prelude"], spans["shared"], spans["coda"])):
        for src in range(span[0], span[1] + 1):
            i = counters.get(part, 0)
            out.update({f"{part}.{i}.{k[len(f'prelude.{src}.'):]}": v for k, v in weights.items()
                        if k.startswith(f"prelude.{src}.")})
            counters[part] = i + 1
    return out


def retrofit_config(src: ModelConfig, spans: dict[str, tuple[int, int]], loop: bool, mean_recur: int,
                    r_max: int, seq_len: int) -> ModelConfig:
    size = {k: b - a + 1 for k, (a, b) in spans.items()}
    shape = dict(n_prelude=size["prelude"], n_shared=size["shared"], n_coda=size["coda"], mean_recur=mean_recur,
                 r_max=r_max, adapter="concat", adapter_init="s", state_init="e", state_norm=False,
                 sandwich_norm=False, seq_len=seq_len)
    if not loop:
        shape.update(n_prelude=sum(size.values()), n_shared=0, n_coda=0, mean_recur=1, r_max=1)
    return dataclasses.replace(src, **shape).validate()


def retrofit(ckpt: str | Path, out: str | Path, spans: dict[str, str] | None = None, standard: str = "",
             mean_recur: int = 4, r_max: int = 16, seq_len: int = HEAL_SEQ_LEN) -> Path:
    """Write the retrofitted run directory `out` (or, with standard='iso-params', the kept layers unlooped)."""
    out = Path(out)
    if checkpoint.find(out) is not None:
        raise UserError(f"{out} already holds a checkpoint; choose a new --out")
    src = checkpoint.load(ckpt)
    if src.model_cfg.recursive or src.model_cfg.n_coda:
        raise UserError(f"{src.path} is already recursive; retrofit takes a standard (imported) checkpoint")
    layers = src.model_cfg.n_prelude
    chosen = {**default_spans(layers), **{k: parse_span(v, k) for k, v in (spans or {}).items() if v}}
    check_spans(chosen, layers)
    if standard not in ("", "iso-params"):
        raise UserError(f"--standard {standard!r}: the retrofit's control is iso-params (the kept layers, no loop)")
    cfg = retrofit_config(src.model_cfg, chosen, not standard, mean_recur, r_max,
                          min(seq_len, src.model_cfg.seq_len))
    model = RecurrentLM(cfg)  # the adapter (if any) keeps its init; every block comes from the source
    missing, unexpected = model.load_state_dict(surgery(src.weights, chosen, not standard), strict=False)
    if unexpected or [k for k in missing if not k.startswith("adapter.")]:
        raise UserError(f"the source's weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    train = dataclasses.replace(TrainConfig(), **HEAL, total_batch_tokens=HEAL["batch_size"] * cfg.seq_len)
    return checkpoint.save_step(out / "checkpoint", 0, model, cfg, train, src.tokenizer, keep=1)
