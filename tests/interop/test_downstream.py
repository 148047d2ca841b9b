"""Every command runs an imported tiny Llama (sample, chat in the source's format, serve, eval, bench infer, export
hf) and its retrofit (exit-train, calibrate). Run: `pytest tests/interop/test_downstream.py`."""

import json

import pytest
import torch
from server_support import post_once

from recurchat import checkpoint
from recurchat.cli import main

ARC = "tests/fixtures/benchmarks/arc_easy.jsonl"


@pytest.fixture(scope="module")
def llama_run(imported_llama):
    return imported_llama[0]


@pytest.fixture(scope="module")
def retro_run(imported_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("retro") / "run"
    assert main(["retrofit", "--ckpt", str(imported_llama[0]), "--out", str(out), "--prelude", "0-0", "--shared",
                 "1-2", "--coda", "3-3", "--mean-recur", "2", "--r-max", "6", "--seq-len", "128"]) == 0
    return out


def test_sample_continues_a_prompt_greedily_as_the_engine_does(llama_run, capsys):
    assert main(["sample", "--ckpt", str(llama_run), "-p", "The", "--max-tokens", "10", "--temperature", "0",
                 "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The") and len(out.strip()) > len("The")


def test_chat_renders_the_source_format_and_stops_at_its_end_token(llama_run, capsys, monkeypatch):
    from recurchat.infer import engine as engine_module
    seen = []
    real = engine_module.Engine.stream

    def spy(self, prompts, *args, **kwargs):
        seen.append(list(prompts[0]))
        return real(self, prompts, *args, **kwargs)
    monkeypatch.setattr(engine_module.Engine, "stream", spy)
    assert main(["chat", "--ckpt", str(llama_run), "-p", "hello", "--max-tokens", "6", "--dtype", "fp32"]) == 0
    tok = checkpoint.load(llama_run).tokenizer
    assert tok.decode(seen[0]) == ("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
                                   "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_end|>" not in capsys.readouterr().out


def test_serve_answers_chat_completions(llama_run):
    body = {"model": "run", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
    r = post_once(llama_run, body, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_eval_scores_bpb_and_a_benchmark(llama_run, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(llama_run), "--tasks", f"bpb,arc-easy:{ARC}", "--eval-tokens", "256",
                 "--limit", "8", "--dtype", "fp32", "--quiet", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["bpb"]["1"] > 0 and 0 <= res["tasks"]["arc-easy"]["1"] <= 1 and "arc-easy" in res["acc_norm"]


def test_bench_infer_times_decoding(llama_run, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "infer", "--ckpt", str(llama_run), "--tokens", "8", "--eval-tokens", "128", "--sweep", "",
                 "--dtype", "fp32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["cached_over_naive_b1"] == pytest.approx(res["decode_tok_s_b1"] / res["naive_tok_s_b1"])


def test_export_hf_loads_in_transformers_with_the_same_logits(llama_run, tmp_path):
    from transformers import AutoModelForCausalLM
    assert main(["export", "hf", "--ckpt", str(llama_run), "--out", str(tmp_path / "hf"),
                 "--card-eval-tokens", "0"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    _, ours = checkpoint.load_model(llama_run, "cpu")
    x = torch.randint(0, ours.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-5)


def test_exit_train_and_calibrate_run_on_the_retrofit(retro_run, capsys):
    assert main(["exit-train", "--ckpt", str(retro_run), "--tau", "0.01", "--deep-recur", "4", "--train-tokens",
                 "256", "--eval-tokens", "128", "--steps", "10", "--dtype", "fp32"]) == 0
    assert checkpoint.load_exit_gate(retro_run) is not None
    assert main(["calibrate", "--ckpt", str(retro_run), "--criterion", "latent", "--max-bpb-loss", "0.5",
                 "--eval-tokens", "256", "--dtype", "fp32"]) == 0
    assert checkpoint.calibrated_exit(retro_run).startswith("latent:")
    assert main(["sample", "--ckpt", str(retro_run), "-p", "The", "--exit", "auto", "--max-tokens", "4"]) == 0
