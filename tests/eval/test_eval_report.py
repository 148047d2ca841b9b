"""Sweeps and reports: run_sweep's exact JSON layout on a tiny random model (recursive and standard), the plain
table, and write_report's markdown + PNGs, including results with keys missing.

Run: `pytest tests/eval/test_eval_report.py`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
from support import one_thread, random_model  # noqa: F401  (one_thread is an autouse fixture)

from recurchat.config import ModelConfig
from recurchat.data.tasks import get_task, stream
from recurchat.data.tasks.benchmarks import load_benchmark
from recurchat.data.tokenizer import Tokenizer
from recurchat.errors import UserError
from recurchat.eval.bpb import evaluate_bpb
from recurchat.eval.report import write_report
from recurchat.eval.grid import GridSettings, print_table, run_sweep
from recurchat.eval.result import EvalResult
from recurchat.eval.tasks import centered, eval_generative, score_mc
from recurchat.infer.engine import Engine, RecurParams

ARC = Path(__file__).parents[1] / "fixtures" / "benchmarks" / "arc_easy.jsonl"
ARC_CHANCE = (1 / 4 + 1 / 4 + 1 / 3 + 1 / 5) / 4  # the fixture has 4-, 4-, 3- and 5-choice questions
CFG = ModelConfig(vocab_size=300, d_model=32, n_head=2, n_kv_head=1, n_prelude=1, n_shared=1, n_coda=1,
                  mean_recur=2, r_max=4, seq_len=128)
SPECS = ["bpb", "hops", f"arc-easy:{ARC}"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [topics[k] for k in sorted(topics)[:8]]
    texts += [e.prompt + " " + e.answer for e in stream(get_task("hops"), "train", 0, 200)]
    return Tokenizer.train(texts, 300)


@pytest.fixture(scope="module")
def val_tokens(tokenizer) -> np.ndarray:
    return np.asarray(tokenizer.encode(topics[sorted(topics)[20]])[:300], dtype=np.int64)


@pytest.fixture(scope="module")
def sweep(tokenizer, val_tokens) -> dict:
    model = random_model(CFG)
    return run_sweep(model, tokenizer, val_tokens, tokenizer.token_bytes(),
                     GridSettings(SPECS, [1, 2], ["latent:1e9"], 4, progress=False))


@pytest.fixture(scope="module")
def standard(tokenizer, val_tokens) -> dict:
    model = random_model(dataclasses.replace(CFG, n_shared=0), seed=1)
    return run_sweep(model, tokenizer, val_tokens, None,
                     GridSettings(SPECS, [1, 2], ["latent:1e9"], 2, progress=False))


def test_sweep_json_layout(sweep):
    sweep = sweep.to_json()
    json.loads(json.dumps(sweep))  # JSON-serialisable as it is
    assert EvalResult.from_json(sweep).to_json() == sweep  # what `eval --json` writes reads back as it was
    assert set(sweep) == {"tasks", "exit", "by_difficulty", "acc_by_difficulty", "centered_mean", "chance",
                          "params", "acc_norm", "settings", "notes", "trajectory"}
    assert list(sweep["tasks"]) == ["bpb", "hops", "arc-easy"]
    for name, values in sweep["tasks"].items():
        assert list(values) == ["1", "2"]
        if name != "bpb":  # an accuracy over the 4 examples: a whole number of them correct
            assert all(v * 4 == round(v * 4) for v in values.values()), values
    assert list(sweep["exit"]) == ["latent:1e9"]
    entry = sweep["exit"]["latent:1e9"]
    assert set(entry) == {"acc", "bpb", "mean_recursions", "mean_recursions_by_task"}
    assert set(entry["acc"]) == set(entry["mean_recursions_by_task"]) == {"hops", "arc-easy"}
    assert entry["bpb"] > 0 and 1 <= entry["mean_recursions"] <= CFG.r_max
    assert set(sweep["by_difficulty"]) == {"hops"}
    levels = {str(d) for d in get_task("hops").levels}
    for d, v in sweep["by_difficulty"]["hops"].items():
        assert d in levels and set(v) == {"acc", "mean_recursions"} and 1 <= v["mean_recursions"] <= CFG.r_max
    # accuracy by level at every setting: each level's share of the task's examples, averaging back to the whole
    assert set(sweep["acc_by_difficulty"]) == {"hops"}
    by_level = sweep["acc_by_difficulty"]["hops"]
    assert list(by_level) == ["1", "2", "latent:1e9"]
    assert by_level["latent:1e9"] == {d: v["acc"] for d, v in sweep["by_difficulty"]["hops"].items()}
    for setting, accs in by_level.items():
        assert set(accs) <= levels
        overall = entry["acc"]["hops"] if ":" in setting else sweep["tasks"]["hops"][setting]
        assert all(0 <= a <= 1 for a in accs.values()) and (overall > 0) == any(a > 0 for a in accs.values())
    assert sweep["chance"] == {"hops": 0.0, "arc-easy": pytest.approx(ARC_CHANCE)}
    assert list(sweep["centered_mean"]) == ["1", "2", "latent:1e9"]
    for setting, value in sweep["centered_mean"].items():
        accs = (entry["acc"] if setting == "latent:1e9" else
                {n: sweep["tasks"][n][setting] for n in ("hops", "arc-easy")})
        assert value == pytest.approx(sum(centered(a, sweep["chance"][n]) for n, a in accs.items()) / 2)
    assert set(sweep["acc_norm"]) == {"arc-easy"} and list(sweep["acc_norm"]["arc-easy"]) == ["1", "2", "latent:1e9"]
    assert sweep["params"] == random_model(CFG).num_params()["total"]
    assert sweep["settings"]["n_examples"] == {"hops": 4, "arc-easy": 4}
    assert sweep["settings"]["by_difficulty_at"] == "latent:1e9" and sweep["notes"] == []


def test_sweep_values_are_what_each_evaluation_returns(sweep, tokenizer, val_tokens):
    """Every number filed under (task, r) is the fraction of correct examples (or the bpb) that scoring that task
    at that r gives on its own: nothing swapped between depths, acc and acc_norm, or tasks."""
    model = random_model(CFG)  # the sweep fixture's weights
    engine = Engine(model, dtype="auto")  # run_sweep's default dtype, so the numbers are the same computation
    arc = load_benchmark("arc-easy", ARC)[:4]
    hops = stream(get_task("hops"), "test", 0, 4)
    for r in (1, 2):
        mc = score_mc(model, tokenizer, arc, r, batch_size=16, dtype=engine.dtype)
        assert sweep.tasks["arc-easy"][str(r)] == sum(x["correct"] for x in mc) / 4
        assert sweep.acc_norm["arc-easy"][str(r)] == sum(x["correct_norm"] for x in mc) / 4
        gen = eval_generative(engine, tokenizer, hops, RecurParams(num_recur=r), max_tokens=16, batch_size=16)
        assert sweep.tasks["hops"][str(r)] == sum(x["correct"] for x in gen) / 4
        bpb = evaluate_bpb(model, val_tokens, tokenizer.token_bytes(), 16, CFG.seq_len, None, num_recur=r,
                           dtype=engine.dtype)
        assert sweep.tasks["bpb"][str(r)] == pytest.approx(bpb, rel=1e-6)


def test_standard_model_is_evaluated_at_r1_only(standard):
    assert all(list(v) == ["1"] for v in standard.tasks.values())
    assert standard.exit == {} and list(standard.centered_mean) == ["1"]
    assert "standard model" in standard.notes[0]
    assert standard.settings["n_examples"] == {"hops": 2, "arc-easy": 2}


def test_by_difficulty_at_mean_recur_without_exits(tokenizer):
    result = run_sweep(random_model(CFG), tokenizer, None, None, GridSettings(["hops"], [1], [], 3, seed=5,
                                                                              progress=False))
    assert result.by_difficulty_at == "2" and result.exit == {}
    assert all(v.mean_recursions == 2.0 for v in result.by_difficulty["hops"].values())  # measured at r̄ = 2


def test_sweep_rejects_bad_input_before_evaluating(tokenizer):
    model = random_model(CFG)
    with pytest.raises(UserError, match="bad exit criterion"):
        run_sweep(model, tokenizer, None, None, GridSettings(["hops"], [1], ["kl"], 2, progress=False))
    with pytest.raises(UserError, match="held-out tokens"):
        run_sweep(model, tokenizer, None, None, GridSettings(["bpb"], [1], [], 2, progress=False))
    with pytest.raises(UserError, match="unknown task"):
        run_sweep(model, tokenizer, None, None, GridSettings(["nope"], [1], [], 2, progress=False))
    with pytest.raises(UserError, match="limit"):
        run_sweep(model, tokenizer, None, None, GridSettings(["hops"], [1], [], 0, progress=False))


def test_print_table(sweep, standard):
    text = print_table(sweep)
    lines = text.splitlines()
    assert lines[0].split() == ["task", "r=1", "r=2"]
    assert any(line.startswith("hops") for line in lines) and any(line.startswith("centered mean") for line in lines)
    assert any(line.startswith("latent:1e9") for line in lines)
    assert "note: standard model" in print_table(standard)
    assert print_table(EvalResult()) == ""


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_write_report(sweep, standard, tmp_path):
    path = write_report(sweep, tmp_path / "report", baseline=standard)
    assert path == tmp_path / "report" / "report.md"
    text = path.read_text()
    assert text.startswith("# recurchat eval") and "| hops |" in text and "Standard model (baseline)" in text
    for name in ("acc_vs_r.png", "bpb_vs_r.png", "pareto.png", "depth_vs_difficulty.png"):
        assert _is_png(path.parent / name), name
        assert f"]({name})" in text
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_write_report_skips_missing_data(tmp_path):
    path = write_report(EvalResult(), tmp_path / "empty", title="nothing")
    assert path.read_text().startswith("# nothing") and not list(path.parent.glob("*.png"))
    partial = {"tasks": {"hops": {"1": 0.5, "2": None, "x": 0.1}}, "exit": {"kl:0.1": {}},
               "by_difficulty": {"hops": {"1": {"acc": 0.5}}}, "centered_mean": {"1": float("nan")}}
    path = write_report(EvalResult.from_json(partial), tmp_path / "partial",
                        baseline=EvalResult.from_json({"tasks": {}}))
    pngs = {p.name for p in path.parent.glob("*.png")}
    assert pngs == {"acc_vs_r.png", "pareto.png", "depth_vs_difficulty.png"}
    assert all(_is_png(path.parent / name) for name in pngs)
