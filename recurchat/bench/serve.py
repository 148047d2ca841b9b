"""Serving benchmark: the same Poisson load through the real HTTP API against static and continuous batching.

    recurchat bench serve --ckpt runs/tiny [--clients 16] [--requests 64] [--rate 8] [--json bench_serve.json]

For each mode a `recurchat serve` process is started on a free 127.0.0.1 port (its own process, so the load
generator never competes with it for the GIL), and one seeded workload is replayed against it: requests arrive as
a Poisson process of `rate` per second, at most `clients` in flight (a request waits for a free client), with
prompts of mixed lengths cut from held-out text (1/32, 1/8, 3/8 of the context), mixed max_tokens (1/16, 1/4, 1/2
of it) and mixed recursion settings (fixed r̄, fixed r̄/2, and an exit criterion — the calibrated one if the
checkpoint has it), streamed with per-token depths.
Reported per mode: time to first token (TTFT) and inter-token latency (ITL) p50/p99, total throughput in tokens/s
over the run's wall time, mean depth per token; and `ttft_p99_ratio`, `throughput_ratio` (continuous ÷ static).
Exercised by `pytest tests/test_bench_serve.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from recurchat.errors import UserError

MODES = ("static", "continuous")


@dataclass
class Sample:
    """What one request saw: when it was sent, when each token arrived, its tokens' depths."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)


def workload(tokens: np.ndarray, requests: int, rate: float, rbar: int, exit_spec: str, context: int = 256,
             seed: int = 0) -> list[dict]:
    """Seeded requests: arrival offset (s) and body; prompts of 1/32, 1/8 or 3/8 of the context (8/32/96 tokens for
    256) and max_tokens of 1/16, 1/4 or 1/2 of it (16/64/128), so every request fits."""
    rng = np.random.default_rng(seed)
    prompt_lens = [max(1, context * k // 32) for k in (1, 4, 12)]
    max_tokens = [max(1, context * k // 16) for k in (1, 4, 8)]
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
    recursions = [{"num_recur": rbar}, {"num_recur": max(1, rbar // 2)}, {"exit": exit_spec}]
    out = []
    for i, at in enumerate(arrivals):
        n = int(rng.choice(prompt_lens))
        start = int(rng.integers(0, len(tokens) - n))
        body = {"prompt": tokens[start:start + n].astype(int).tolist(), "max_tokens": int(rng.choice(max_tokens)),
                "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True, "return_depths": True,
                "recursion": recursions[int(rng.integers(len(recursions)))]}
        out.append({"at": float(at), "body": body})
    return out


async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, t0: float, item: dict) -> Sample:
    await asyncio.sleep(max(0.0, t0 + item["at"] - time.perf_counter()))
    async with gate:
        sample = Sample(time.perf_counter())
        async with client.stream("POST", "/v1/completions", json=item["body"]) as r:
            if r.status_code != 200:
                raise UserError(f"bench serve: the server answered {r.status_code}: {await r.aread()!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    for d in choice.get("depths") or []:
                        sample.arrivals.append(time.perf_counter())
                        sample.depths.append(d)
        return sample


async def replay(url: str, items: list[dict], clients: int, model: str) -> tuple[list[Sample], float]:
    gate = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        samples = await asyncio.gather(*(one(client, gate, t0, {**it, "body": {**it["body"], "model": model}})
                                         for it in items))
        return list(samples), time.perf_counter() - t0


def summarize(samples: list[Sample], wall: float) -> dict:
    ttft = [s.arrivals[0] - s.sent for s in samples if s.arrivals]
    itl = [b - a for s in samples for a, b in zip(s.arrivals, s.arrivals[1:])]
    depths = [d for s in samples for d in s.depths]
    tokens = sum(len(s.depths) for s in samples)
    return {"requests": len(samples), "tokens": tokens, "wall_s": wall, "throughput_tok_s": tokens / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_s": float(np.percentile(itl, 50)), "itl_p99_s": float(np.percentile(itl, 99)),
            "mean_depth": sum(depths) / len(depths)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, batching: str, max_batch: int, dtype: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recurchat", "serve", "--ckpt", ckpt, "--port", str(port), "--batching", batching,
           "--max-batch", str(max_batch), "--queue-size", "1024", "--dtype", dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"bench serve: the {batching} server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise UserError(f"bench serve: the {batching} server did not come up in 180 s")


def bench_serve(ckpt: str, clients: int = 16, requests: int = 64, rate: float = 8.0, max_batch: int = 16,
                modes: tuple[str, ...] = MODES, dtype: str = "auto", log=print) -> dict:
    from recurchat.checkpoint import calibrated_exit, load
    from recurchat.data.corpus import prepare_data
    from recurchat.eval.evaluate import heldout_source
    from recurchat.serve.server import ALIAS  # the name every recurchat server answers to

    loaded = load(ckpt)
    cfg = loaded.model_cfg
    val = prepare_data(heldout_source(loaded, None), cfg.vocab_size, tokenizer=loaded.tokenizer,
                       log=lambda *a, **k: None).val
    exit_spec = calibrated_exit(loaded.path) or "kl:3e-2"
    items = workload(val, requests, rate, cfg.mean_recur, exit_spec, cfg.seq_len)
    log(f"bench serve: {requests} requests, Poisson {rate:g}/s, {clients} clients, max batch {max_batch}, "
        f"recursion fixed {cfg.mean_recur} / {max(1, cfg.mean_recur // 2)} / exit {exit_spec}")
    result: dict = {"clients": clients, "requests": requests, "rate": rate, "max_batch": max_batch,
                    "exit": exit_spec}
    for mode in modes:
        port = free_port()
        proc = start_server(ckpt, mode, max_batch, dtype, port)
        try:
            samples, wall = asyncio.run(replay(f"http://127.0.0.1:{port}", items, clients, ALIAS))
        finally:
            proc.terminate()
            proc.wait(30)
        result[mode] = row = summarize(samples, wall)
        log(f"  {mode:<10} TTFT p50 {row['ttft_p50_s']:.3f} s  p99 {row['ttft_p99_s']:.3f} s   ITL p50 "
            f"{1000 * row['itl_p50_s']:.1f} ms  p99 {1000 * row['itl_p99_s']:.1f} ms   "
            f"{row['throughput_tok_s']:.0f} tok/s   mean depth {row['mean_depth']:.2f}")
    if all(m in result for m in MODES):
        result["ttft_p99_ratio"] = result["continuous"]["ttft_p99_s"] / result["static"]["ttft_p99_s"]
        result["throughput_ratio"] = result["continuous"]["throughput_tok_s"] / result["static"]["throughput_tok_s"]
        log(f"  continuous ÷ static: TTFT p99 {result['ttft_p99_ratio']:.2f}×, throughput "
            f"{result['throughput_ratio']:.2f}×")
    return result
