"""Parity of an imported checkpoint with transformers' own load of the same source: logits and greedy text.

    python -m recurchat.interop.parity --ckpt runs/smollm2 --gguf $(python -m recurchat.interop.smollm2)
    python -m recurchat.interop.parity --ckpt runs/llama --hf path/to/llama-folder

For each prompt: do the two tokenizers agree, the largest |logit difference| over the prompt in fp32, and do greedy
continuations (recurchat's KV-cached engine vs transformers' generate) agree token for token. Exits non-zero on any
mismatch. The reference is loaded by transformers itself (for GGUF: `from_pretrained(dir, gguf_file=…)`, which
needs accelerate), so nothing of recurchat's importer is in it. Exercise: `pytest tests/interop/test_import.py`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from recurchat import checkpoint
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams

PROMPTS = ("The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
           "The three primary colors are", "Question: what is 12 + 35?\nAnswer:")


@dataclass
class PromptParity:
    prompt: str
    same_tokens: bool
    max_logit_diff: float
    same_greedy: bool
    ours: list[int]
    theirs: list[int]

    @property
    def ok(self) -> bool:
        return self.same_tokens and self.same_greedy


def reference(hf: str | None = None, gguf: str | None = None):
    """(transformers model in fp32, its tokenizer) loaded by transformers from the source."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {} if hf else {"gguf_file": Path(gguf).name}
    where = hf or str(Path(gguf).parent)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(where, **kwargs)


@torch.no_grad()
def reference_greedy(model, x: torch.Tensor, tokens: int) -> list[int]:
    """`tokens` argmax steps through transformers' own KV cache, with no stop token (generate() would stop at EOS,
    and forbidding EOS with min_new_tokens changes which token wins)."""
    out = model(x, use_cache=True)
    picked = []
    for _ in range(tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        picked.append(int(nxt))
        out = model(nxt, cache=out.cache, use_cache=True)  # transformers >= 5 names it `cache`
    return picked


@torch.no_grad()
def compare(ckpt_path: str, ref_model, ref_tok, prompts=PROMPTS, tokens: int = 32) -> list[PromptParity]:
    ckpt, model = checkpoint.load_model(ckpt_path, "cpu")
    engine = Engine(model, dtype="fp32")
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, stop_ids=())
    out = []
    for prompt in prompts:
        ids = ckpt.tokenizer.encode(prompt)
        ref_ids = ref_tok(prompt, add_special_tokens=False).input_ids
        x = torch.tensor([ids])
        diff = (model(x) - ref_model(x).logits.float()).abs().max().item()
        ours = engine.generate([ids], [greedy], RecurParams(num_recur=1))[0].tokens
        theirs = reference_greedy(ref_model, x, tokens)
        out.append(PromptParity(prompt, ids == ref_ids, diff, list(ours) == theirs, list(ours), theirs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="the imported run (recurchat import --out)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="the transformers folder it was imported from")
    src.add_argument("--gguf", help="the GGUF file it was imported from")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    ref_model, ref_tok = reference(args.hf, args.gguf)
    results = compare(args.ckpt, ref_model, ref_tok, tokens=args.tokens)
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} tokens {'=' if r.same_tokens else '≠'} | max |Δlogit| "
              f"{r.max_logit_diff:.2e} | greedy {args.tokens} {'=' if r.same_greedy else '≠'} | {r.prompt!r}")
    print(f"{sum(r.ok for r in results)}/{len(results)} prompts identical")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
