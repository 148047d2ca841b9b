"""Probe runs on the ordinary trainer: the checks before the first step and the validation figures.

    recurchat train --preset probe --data probe:parity:1-8 --out runs/parity

`check_probe` refuses, in one line, a probe the model cannot hold (vocabulary, sequence length, a loss reach that
leaves r = 1 nothing to learn, hints for a standard model or a probe without intermediate targets); `validation` is
what the trainer logs at each evaluation: label accuracy on held-out sequences of the trained levels (`val_acc`) and
of the levels up to twice the hardest trained one (`val_acc_long`).
Exercised by `pytest tests/train/test_probe_training.py`.
"""

from __future__ import annotations


from recurchat.config import ModelConfig, TrainConfig
from recurchat.data.tasks.probes import ProbeSpec, same_vocabulary
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.eval.probes import probe_accuracy
from recurchat.model.hardware import DtypeChoice
from recurchat.model.recurrent import RecurrentLM


def check_probe(probe: ProbeSpec, m: ModelConfig, t: TrainConfig, known: Tokenizer | None) -> Tokenizer:
    """The probe's tokenizer, after checking that the model can hold its vocabulary, its sequences and its loss
    mask; `known` is the tokenizer a resumed checkpoint fixes, if any."""
    tokenizer = probe.tokenizer()
    if known is not None and not same_vocabulary(probe, known):
        raise UserError(f"--data {t.data}: the checkpoint's tokenizer is not this probe's vocabulary")
    if tokenizer.vocab_size > m.vocab_size:
        raise UserError(f"probe {probe.name} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{m.vocab_size}")
    if probe.width > m.seq_len:
        raise UserError(f"probe {probe.name} sequences are {probe.width} tokens but seq_len is {m.seq_len}")
    if t.loss_reach >= 0 and m.recursive and probe.levels[0] > 1 + t.loss_reach:
        raise UserError(f"--loss-reach {t.loss_reach}: at r = 1 no label of {probe.name} is within reach "
                        f"(its easiest level is {probe.levels[0]})")
    if t.hint_weight > 0 and not (m.recursive and probe.probe.has_hints):
        raise UserError(f"--hint-weight needs a recursive model and a probe with intermediate targets (chase), "
                        f"not {probe.name} on a {'recursive' if m.recursive else 'standard'} model")
    return tokenizer


def validation(net: RecurrentLM, probe: ProbeSpec, depths: list[int], dtype: DtypeChoice, eval_tokens: int,
               step: int) -> dict:
    """{"step", "val_acc": {r: acc}, "val_acc_long": {r: acc}} (the longer levels only where they fit seq_len)."""
    n = max(8, eval_tokens // 256)
    longer = probe.at_levels(probe.levels[-1] + 1, 2 * probe.levels[-1])
    record = {"step": step, "val_acc": {str(r): probe_accuracy(net, probe, r, n, dtype) for r in depths}}
    if longer.width <= net.cfg.seq_len:
        record["val_acc_long"] = {str(r): probe_accuracy(net, longer, r, n, dtype) for r in depths}
    return record


def describe(record: dict) -> str:
    """One progress line for a validation record."""
    def part(values: dict) -> str:
        return ", ".join(f"r={r}: {v:.3f}" for r, v in values.items())
    return (f"step {record['step']}: val acc {part(record['val_acc'])}"
            + (f" · longer {part(record['val_acc_long'])}" if "val_acc_long" in record else ""))
