"""recurchat checkpoints as an lm-evaluation-harness model, at any recursion depth or exit criterion.

    recurchat lm-eval --model recurchat --model_args ckpt=runs/tiny,recur=8 --tasks arc_easy    # lm_eval's CLI
    recurchat eval --ckpt runs/tiny --harness arc_easy,hellaswag --recur 8                        # the shortcut

    import recurchat.eval.harness, lm_eval    # registers "recurchat"
    lm_eval.simple_evaluate(model="recurchat", model_args="ckpt=runs/tiny,exit=kl:1e-3", tasks=["arc_easy"])

model_args: ckpt (required), recur (fixed depth, default r̄) or exit (a criterion, `auto` for the calibrated one)
with max_recur, kv, dtype, device, batch_size, max_gen_toks. Requests go through recurchat's own scorers, so the
numbers are the ones `recurchat eval` reports on the same items: loglikelihood and loglikelihood_rolling score BOS +
context + continuation (context and continuation tokenized separately, as recurchat's multiple-choice scoring does)
in batches through one forward at fixed depth, or through the KV-cached engine token by token under an exit;
generate_until decodes greedily (or samples, if asked) through the engine in batches that share settings.
lm-eval 0.4 resolves `--model NAME` only through its own table, so `lm_eval --model recurchat` works where this
module has been imported first: `recurchat lm-eval` is lm_eval's CLI with it imported.
Exercised by `pytest tests/eval/test_harness.py`.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from recurchat import checkpoint
from recurchat.eval.tasks import RowScore, score_rows, token_rows
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams

log = logging.getLogger("recurchat.harness")


@register_model("recurchat")
class RecurchatLM(LM):
    def __init__(self, ckpt: str, recur: int | None = None, exit: str | None = None, max_recur: int | None = None,
                 kv: str = "full", dtype: str = "auto", device: str = "auto", batch_size: int | str = 16,
                 max_gen_toks: int = 256, **ignored):
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda:0 unless told otherwise; its own models fall back the same way
            log.warning("device %s: torch sees no CUDA device here; using %s", device, "auto")
            device = "auto"
        loaded, self.model = checkpoint.load_model(str(ckpt), device or "auto")
        self.tok, self.cfg = loaded.tokenizer, self.model.cfg
        self.engine = Engine.for_checkpoint(loaded, self.model, dtype)
        self._device = self.engine.device
        exit = checkpoint.resolve_exit(exit, loaded.path)
        self.recur = self.engine.check_recur(RecurParams(num_recur=None if exit else (int(recur) if recur else None),
                                                         exit=exit, max_recur=int(max_recur) if max_recur else None,
                                                         kv=kv))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" → the default
        self.max_gen_toks = int(max_gen_toks)

    # -- scoring --------------------------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[RowScore]:
        rows = token_rows(self.tok.bos_id, pairs, self.cfg.seq_len)
        adaptive = self.recur.exit is not None
        return score_rows(self.model, rows, self.tok.pad_id, self.recur.num_recur, self.batch_size,
                          self.engine if adaptive else None, self.recur if adaptive else None, self.engine.dtype)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [(self.tok.encode(ctx), self.tok.encode(cont)) for ctx, cont in (r.args for r in requests)]
        return [(s.logprob, s.greedy) for s in self._score(pairs)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-text log-likelihood: disjoint windows of the context length, each conditioned on what precedes it
        within the window (the first on BOS), as lm-eval's own models do."""
        out = []
        for (text, *_) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(text), prefix_token=self.tok.bos_id, max_seq_len=self.cfg.seq_len, context_len=1)]
            # token_rows puts BOS first itself: drop it where the window's context is just that BOS
            pairs = [(ctx[1:] if ctx[:1] == [self.tok.bos_id] else ctx, cont) for ctx, cont in windows]
            out.append(sum(s.logprob for s in self._score(pairs)))
        return out

    # -- generation -----------------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = SamplingParams(max_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                      temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample")
                                      else 0.0, seed=0, stop_ids=tuple(self.tok.special_ids()))
            room = self.cfg.seq_len - 1
            prompts = [([self.tok.bos_id] + self.tok.encode(requests[i].args[0]))[-room:] for i in members]
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                gens = self.engine.generate(prompts[start:start + len(batch)], sampling, self.recur)
                for i, g in zip(batch, gens):
                    out[i] = cut_at(self.tok.decode(g.tokens), until)
        return out  # type: ignore[return-value]


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first of the stop strings (lm-eval's `until`)."""
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


def main(argv: list[str] | None = None) -> int:
    """`recurchat lm-eval ARGS`: lm_eval's own command line, with the recurchat model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm_eval", *(argv if argv is not None else sys.argv[1:])]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0
