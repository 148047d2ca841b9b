"""Multi-process training on CPU (gloo): 2 ranks = 1 rank, DDP ≈ FSDP2, checkpoints move between world sizes.

Run: `pytest tests/train/test_distributed.py` (~90 s on 2 busy cores; real processes: `python -m
torch.distributed.run --standalone --nproc_per_node=2 -m recurchat train …` subprocesses, and
torch.multiprocessing workers for the gradient checks).

Tolerances, and why they differ:
  * 1 rank × micro-batch 1 × 2 micro-steps vs 2 ranks × micro-batch 1 (DDP), fixed depth, fp32: bitwise equal
    (checked at atol 1e-6). Per-row forward/backward are the same kernels, L/2 accumulated locally equals
    DDP's (L0 + L1)/2 exactly (a two-term sum, scaling by 2 is exact), so nothing differs and the comparison
    can be exact — including across a resume from 2 ranks onto 1.
  * Anything else differs by rounding before the optimizer: FSDP2 (same gradients, but its grad norm sums the
    shards in another order and Muon's Newton–Schulz runs as sharded bf16 matmuls), a different micro-batch
    shape, more summands. torch.optim.Muon orthogonalises in bf16, so a ~1e-7 relative change flips bf16
    roundings (2^-8 relative each) and these compound over steps; AdamW's eps=1e-10 similarly lets the sign
    noise of near-zero gradients become lr-sized steps. Such runs are compared by loss (rtol 1e-4, measured
    ≤ 2e-5) and by the global relative parameter distance ‖w_a − w_b‖ / ‖w_a − w_init‖ < 0.05 (measured
    0.004–0.014 after 4 steps; a run that sees half the data per step measures 0.79).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recurchat import checkpoint
from recurchat.config import ModelConfig, get_preset
from recurchat.errors import UserError
from recurchat.model.recurrent import RecurrentLM
from recurchat.train.optim import build_optimizers

EXACT_ATOL = 1e-6
LOSS_RTOL = 1e-4
REL_PARAM_DIST = 0.05


def launch(nproc: int, args: list[str], home: str | Path | None = None, timeout: float = 300) -> None:
    """`recurchat train ARGS` in `nproc` fresh processes (torchrun for more than one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if home is not None:
        env["RECURCHAT_HOME"] = str(home)
    prefix = [sys.executable, "-m"]
    if nproc > 1:
        prefix += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    proc = subprocess.run([*prefix, "recurchat", "train", "--quiet", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{nproc} process(es) failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def rank_records(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / "ranks" / f"rank{rank}.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.resolve(run) / "model.safetensors"))


def optimizer_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(checkpoint.resolve(run) / "state" / "optimizer.safetensors")).items()
            if not k.startswith("rng.")}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], model_cfg: ModelConfig) -> float:
    """‖a − b‖ / ‖a − init‖ over all weights: how far apart two runs ended, relative to how far they travelled."""
    torch.manual_seed(0)  # the trainer's seed: the weights every run started from
    init = RecurrentLM(model_cfg).state_dict()
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a)
    den = sum(((a[k] - init[k]) ** 2).sum() for k in a)
    return float((num / den).sqrt())


def assert_losses_close(a: Path, b: Path, rtol: float) -> None:
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4]
    for step in ma:
        assert ma[step]["loss"] == pytest.approx(mb[step]["loss"], rel=rtol), step


# -- fixed depth: the exactly comparable runs -------------------------------------------------------------------

def common(small_text: Path, *extra: str) -> list[str]:
    # fixed:3 with k = 2: one no-grad iteration every micro-step; grad-clip 0.1 is below every step's norm, so
    # clipping is active throughout.
    return ["--preset", "cpu-smoke", "--data", str(small_text), "--dtype", "fp32", "--max-steps", "4",
            "--eval-every", "0", "--eval-tokens", "256", "--bptt-k", "2", "--grad-clip", "0.1", *extra]


@pytest.fixture(scope="module")
def exact(tmp_path_factory, small_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exact")
    # micro-batch 1 and 128 tokens per step: 2 micro-steps on 1 rank, 1 micro-step on each of 2 ranks
    args = common(small_text, "--recur-dist", "fixed:3", "--batch-size", "1", "--total-batch-tokens", "128")
    runs = {name: root / name for name in ("ref", "ddp", "two_to_one", "one_to_two")}
    launch(1, [*args, "--out", str(runs["ref"])])
    # A fresh $RECURCHAT_HOME: rank 0 trains the tokenizer and writes the token cache while rank 1 waits.
    runs["fresh_home"] = root / "home"
    launch(2, [*args, "--out", str(runs["ddp"])], home=runs["fresh_home"])
    launch(2, [*args, "--out", str(runs["two_to_one"]), "--stop-after", "2"])
    launch(1, ["--resume", str(runs["two_to_one"]), "--out", str(runs["two_to_one"])])
    launch(1, [*args, "--out", str(runs["one_to_two"]), "--stop-after", "2"])
    launch(2, ["--resume", str(runs["one_to_two"]), "--out", str(runs["one_to_two"]), "--parallel", "fsdp"])
    return runs


def test_two_ranks_equal_one_rank_with_the_same_global_batch(exact):
    ref, ddp = exact["ref"], exact["ddp"]
    assert max_abs_diff(weights(ref), weights(ddp)) <= EXACT_ATOL
    assert max_abs_diff(optimizer_tensors(ref), optimizer_tensors(ddp)) <= EXACT_ATOL
    mr, md = metrics(ref), metrics(ddp)
    for step in (1, 2, 3, 4):
        # ref sums two fp32 micro-losses, the 2-rank run averages two ranks' in fp64: same value to rounding
        assert md[step]["loss"] == pytest.approx(mr[step]["loss"], rel=1e-6)
        assert md[step]["grad_norm"] == pytest.approx(mr[step]["grad_norm"], rel=1e-6)
        assert mr[step]["grad_norm"] > 0.1  # the clip was active on every step
        assert mr[step]["r"] == [3, 3] and md[step]["r"] == [3]  # accumulation 2 on one rank, 1 on two
        # metrics count the global batch, whichever way it was split
        assert md[step]["flops_per_token"] == pytest.approx(mr[step]["flops_per_token"])
    # rank 0 alone writes metrics and the checkpoint; every rank logs its own depths
    assert sorted(p.name for p in (ddp / "ranks").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    assert not any(p.name.startswith(".") for p in ddp.iterdir())
    # data preparation happened once, by rank 0, in the fresh home
    assert len(list((exact["fresh_home"] / "tokenizers").iterdir())) == 1
    assert len(list((exact["fresh_home"] / "tokens").iterdir())) == 1


def test_checkpoint_from_two_ranks_resumes_on_one_exactly(exact):
    ref, resumed = exact["ref"], exact["two_to_one"]
    assert max_abs_diff(weights(ref), weights(resumed)) <= EXACT_ATOL
    mr, mm = metrics(ref), metrics(resumed)
    assert sorted(mm) == [1, 2, 3, 4]
    for step in (3, 4):  # the steps the single process ran after resuming
        assert mm[step]["loss"] == mr[step]["loss"]
        assert mm[step]["r"] == [3, 3]
    trainer_state = json.loads((checkpoint.resolve(resumed) / "state" / "trainer.json").read_text())
    assert trainer_state["step"] == 4 and trainer_state["grad_accum"] == 2


def test_checkpoint_from_one_rank_resumes_on_two_under_fsdp(exact):
    ref, resumed = exact["ref"], exact["one_to_two"]
    assert_losses_close(ref, resumed, LOSS_RTOL)
    ck = checkpoint.load(resumed)
    assert relative_distance(weights(ref), ck.weights, ck.model_cfg) < REL_PARAM_DIST
    # Written by FSDP2 ranks, yet the single-process format: same tensors, shapes, dtypes, optimizer layout.
    for a, b in ((weights(ref), ck.weights), (optimizer_tensors(ref), optimizer_tensors(resumed))):
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    model = RecurrentLM(ck.model_cfg)
    checkpoint.load_model_weights(model, ck)
    state = checkpoint.load_train_state(ck, build_optimizers(model, ck.train_cfg))
    assert state["step"] == 4 and state["grad_accum"] == 1
    assert all(len(rank_records(resumed, r)) == 2 for r in (0, 1))  # ranks log only the steps they ran


# -- Poisson log-normal depth: ranks must agree on r -----------------------------------------------------------

@pytest.fixture(scope="module")
def sampled(tmp_path_factory, small_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sampled")
    args = common(small_text, "--recur-dist", "poisson-lognormal", "--total-batch-tokens", "256")
    runs = {name: root / name for name in ("one", "ddp", "fsdp")}
    # 4 rows per step in 2 micro-steps everywhere, so all three draw sampler.sample(step, 2)
    launch(1, [*args, "--batch-size", "2", "--out", str(runs["one"])])
    launch(2, [*args, "--batch-size", "1", "--out", str(runs["ddp"])])
    launch(2, [*args, "--batch-size", "1", "--out", str(runs["fsdp"]), "--parallel", "fsdp"])
    return runs


@pytest.mark.slow
def test_every_rank_draws_the_same_depths(sampled):
    expected = [metrics(sampled["one"])[step]["r"] for step in (1, 2, 3, 4)]
    flat = [r for rs in expected for r in rs]
    assert len(set(flat)) > 1 and max(flat) > 2  # depth varies, and some steps run no-grad iterations (r > k)
    for mode in ("ddp", "fsdp"):
        for rank in (0, 1):
            records = rank_records(sampled[mode], rank)
            assert [rec["step"] for rec in records] == [1, 2, 3, 4]
            assert [rec["r"] for rec in records] == expected, (mode, rank)
        # the logged loss is the mean of the ranks' losses
        for step, m in metrics(sampled[mode]).items():
            local = [rank_records(sampled[mode], rank)[step - 1]["loss"] for rank in (0, 1)]
            assert m["loss"] == pytest.approx(sum(local) / 2, rel=1e-6)


@pytest.mark.slow
def test_ddp_and_fsdp_agree(sampled):
    one, ddp, fsdp = sampled["one"], sampled["ddp"], sampled["fsdp"]
    cfg = checkpoint.load(one).model_cfg
    for a, b in ((ddp, fsdp), (one, ddp), (one, fsdp)):
        assert_losses_close(a, b, LOSS_RTOL)
        # the first step sees identical weights everywhere, so only summation order separates these
        assert metrics(a)[1]["loss"] == pytest.approx(metrics(b)[1]["loss"], rel=1e-6)
        assert metrics(a)[1]["grad_norm"] == pytest.approx(metrics(b)[1]["grad_norm"], rel=1e-5)
        assert relative_distance(weights(a), weights(b), cfg) < REL_PARAM_DIST, (a.name, b.name)


# -- gradients of the wrapped model, straight from torch.multiprocessing workers --------------------------------

@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_wrapped_gradients_equal_single_process_for_every_depth(mode):
    """find_unused_parameters=False / static_graph=False hold up as r varies and iterations run under no_grad, with
    no_sync (DDP) / set_requires_gradient_sync(False) (FSDP2) on the first of two micro-steps. The workers live in
    dist_grad_worker.py and run under torchrun, like real training (a subprocess timeout fails instead of hanging)."""
    worker = Path(__file__).with_name("dist_grad_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), mode], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{mode} gradient workers failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("gradients match") == 2


def test_parallel_mode_is_validated():
    cfg = get_preset("cpu-smoke").train
    cfg.parallel = "zero3"
    with pytest.raises(UserError, match="unknown parallel mode"):
        cfg.validate()


# -- a preset under torchrun: the per-rank batch adapts unless --batch-size is given -----------------------------

def test_the_per_rank_batch_is_fitted_to_the_world_size_unless_given():
    from recurchat.train.spec import RunSpec, fit_batch_to_world
    preset = get_preset("cpu-tiny")  # batch 8 × seq_len 256, 2048 tokens per step
    spec = RunSpec(preset.model, preset.train, Path("unused"))
    assert fit_batch_to_world(spec, 1) == (spec, None)
    assert fit_batch_to_world(spec, 3) == (spec, None)  # 8 rows per step do not split over 3 ranks: refused later
    for world, batch in ((2, 4), (4, 2), (8, 1)):
        fitted, note = fit_batch_to_world(spec, world)
        assert fitted.train.batch_size == batch and fitted.train.total_batch_tokens == 2048
        assert f"batch size {batch} per rank" in note
    grown, note = fit_batch_to_world(spec, 16)
    assert (grown.train.batch_size, grown.train.total_batch_tokens) == (1, 16 * 256) and "grows to 4096" in note
    given = RunSpec(preset.model, preset.train, Path("unused"), batch_size_given=True)
    assert fit_batch_to_world(given, 2) == (given, None)


def test_torchrun_with_a_preset_keeps_its_global_batch_and_an_explicit_conflicting_batch_is_refused(tmp_path,
                                                                                                    small_text):
    args = ["--preset", "cpu-smoke", "--data", str(small_text), "--dtype", "fp32", "--max-steps", "2",
            "--eval-every", "0"]  # cpu-smoke: batch 4 × seq_len 64 = 256 tokens, the whole step on one rank
    launch(2, [*args, "--out", str(tmp_path / "fitted")])
    saved = checkpoint.load(tmp_path / "fitted").train_cfg
    assert (saved.batch_size, saved.total_batch_tokens) == (2, 256)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "recurchat", "train", "--quiet", *args, "--batch-size", "4", "--out", str(tmp_path / "x")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is not a multiple of batch_size × seq_len × world_size = 512" in proc.stderr
