"""`--dtype auto`, the cached bf16 probe, the measured peak, --threads and the banner.

The probe is faked the way a real machine answers it: by its entry in $RECURCHAT_HOME/hardware.json.
Run: `pytest tests/model/test_hardware.py`.
"""

import dataclasses
import json

import pytest
import torch
from support import random_model
from torch.utils._python_dispatch import TorchDispatchMode

from recurchat.config import TrainConfig, get_preset
from recurchat.errors import UserError
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams
from recurchat.model import hardware
from recurchat.train.optim import build_optimizers
from recurchat.train.spec import RunSpec
from recurchat.train.trainer import train

CPU = torch.device("cpu")
MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matmul that runs while active (forward, backward and optimizer alike)."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATMULS:
            self.dtypes.add(out.dtype)
        return out


@pytest.fixture
def fake_probe(monkeypatch):
    """fake_probe(ratio, small=1.0): this machine's cached bf16/fp32 matmul ratio, restored afterwards, and what the
    probe of a decode batch's small matmuls reads (1.0 unless given: bf16 as fast as fp32 there)."""
    path = hardware.cache_path()
    before = path.read_text() if path.exists() else None

    def fake(ratio: float, small: float = 1.0) -> None:
        monkeypatch.setattr(hardware, "bf16_over_fp32_small_matmul", lambda device, matmuls: small)
        table = json.loads(path.read_text()) if path.exists() else {}
        table.setdefault(hardware.machine_key(CPU), {})["bf16_over_fp32_matmul"] = ratio
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table))

    yield fake
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(before)


@pytest.mark.parametrize("ratio, expected", [(0.01, "fp32"), (1.1, "fp32"), (1.2, "bf16"), (3.3, "bf16")])
def test_auto_picks_bf16_only_where_it_is_fast(fake_probe, ratio, expected):
    fake_probe(ratio)
    choice = hardware.choose_dtype("auto", CPU)
    assert choice.name == expected and choice.bf16_over_fp32_matmul == ratio
    assert f"{ratio:.2f}×" in choice.reason
    assert hardware.choose_dtype("fp32", CPU).name == "fp32"


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(fake_probe, capsys):
    fake_probe(0.0123)
    assert hardware.choose_dtype("bf16", CPU).name == "bf16"
    assert hardware.choose_dtype("bf16", CPU).name == "bf16"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.01× fp32" in warnings[0] and "auto would pick fp32" in warnings[0]


def test_probe_measures_once_then_reads_the_cache(fake_probe, monkeypatch):
    fake_probe(1.0)  # (restores the real cache afterwards)
    table = json.loads(hardware.cache_path().read_text())
    del table[hardware.machine_key(CPU)]["bf16_over_fp32_matmul"]
    hardware.cache_path().write_text(json.dumps(table))
    # the probe's timings, faked: an fp32 matmul takes 3× as long as a bf16 one, so bf16 runs at 3× fp32
    seconds = {torch.float32: 0.03, torch.bfloat16: 0.01}
    monkeypatch.setattr(hardware, "best_matmul_seconds", lambda a, b, *args, **kw: seconds[a.dtype])
    measured = hardware.bf16_over_fp32_matmul(CPU)
    assert measured == pytest.approx(3.0)
    monkeypatch.setattr(hardware, "best_matmul_seconds", lambda *a, **k: pytest.fail("measured twice"))
    assert hardware.bf16_over_fp32_matmul(CPU) == measured
    assert json.loads(hardware.cache_path().read_text())[hardware.machine_key(CPU)]["bf16_over_fp32_matmul"] == measured


def test_peak_is_measured_on_the_model_shapes_or_overridden(tiny_cfg, fake_probe):
    fake_probe(0.5)
    choice = hardware.choose_dtype("auto", CPU)
    assert hardware.matmul_shapes(tiny_cfg, 128) == [(128, 64, 64), (128, 64, 256), (128, 256, 64), (128, 64, 320)]
    peak = hardware.resolve_peak(CPU, choice, tiny_cfg, rows=128)
    assert peak.source == "measured" and peak.flops > 1e8
    assert hardware.resolve_peak(CPU, choice, tiny_cfg, 128, override=5e11) == hardware.Peak(5e11, "--peak-flops")
    line = hardware.banner(CPU, choice, peak)
    assert torch.backends.cpu.get_cpu_capability() in line and "fp32" in line and "measured" in line


def test_bad_runtime_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown dtype"):
        hardware.choose_dtype("fp16", CPU)
    with pytest.raises(UserError, match="threads"):
        hardware.set_threads(-1)
    with pytest.raises(UserError, match="device"):
        hardware.resolve_device("tpu")


@pytest.mark.parametrize("ratio, expected", [(0.01, torch.float32), (3.0, torch.bfloat16)])
def test_trainer_computes_in_the_chosen_dtype(fake_probe, small_text, tmp_path, ratio, expected):
    """Forward, backward, Muon's Newton–Schulz and evaluation: every matmul of a training run."""
    fake_probe(ratio)
    preset = get_preset("cpu-smoke")
    cfg = TrainConfig(**{**vars(preset.train), "max_steps": 2, "eval_every": 0, "eval_tokens": 256,
                         "data": str(small_text)})
    with MatmulDtypes() as seen:
        result = train(RunSpec(preset.model, cfg, tmp_path / "run"), progress=False)
    assert result.step == 2
    assert seen.dtypes == {expected}
    run = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["run"]
    assert run["dtype"] == ("bf16" if expected == torch.bfloat16 else "fp32")


@pytest.mark.parametrize("ratio, expected", [(0.01, torch.float32), (3.0, torch.bfloat16)])
def test_optimizer_orthogonalises_in_the_chosen_dtype(fake_probe, tiny_cfg, ratio, expected):
    fake_probe(ratio)
    choice = hardware.choose_dtype("auto", CPU)
    model = random_model(tiny_cfg)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    muon, _ = build_optimizers(model, TrainConfig(), choice.torch_dtype)
    with MatmulDtypes() as seen:
        muon.step()
    assert seen.dtypes == {expected}


@pytest.mark.parametrize("ratio, expected", [(0.01, torch.float32), (3.0, torch.bfloat16)])
def test_engine_decodes_in_the_chosen_dtype(fake_probe, tiny_cfg, ratio, expected):
    fake_probe(ratio)
    engine = Engine(random_model(tiny_cfg))
    with MatmulDtypes() as seen:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0), RecurParams(exit="kl:1e-3"))
    assert seen.dtypes == {expected}


def test_auto_decodes_a_small_compiled_batch_in_fp32_on_a_cpu(fake_probe):
    fake_probe(3.0)  # native bf16 (an AVX-512 BF16 CPU)
    one = hardware.choose_dtype("auto", CPU, compiled_decode_rows=1)
    assert one.name == "fp32" and "compiled decode step of 1 row would cast every weight" in one.reason
    limit = hardware.COMPILED_FP32_ROWS
    assert hardware.choose_dtype("auto", CPU, compiled_decode_rows=limit).name == "fp32"
    assert hardware.choose_dtype("auto", CPU, compiled_decode_rows=limit + 1).name == "bf16"
    assert hardware.choose_dtype("auto", CPU).name == "bf16"  # eager decode, training, scoring
    assert hardware.choose_dtype("bf16", CPU, compiled_decode_rows=1).name == "bf16"  # asked for explicitly
    fake_probe(0.01)  # emulated bf16: fp32 whatever the batch
    assert hardware.choose_dtype("auto", CPU, compiled_decode_rows=64).name == "fp32"


def test_auto_decodes_eagerly_in_fp32_where_small_bf16_matmuls_are_slow(fake_probe, tiny_cfg):
    fake_probe(3.0, small=0.33)  # an AMX Xeon at 1 row: oneDNN's small bf16 matmuls have a fixed cost
    one = hardware.choose_dtype("auto", CPU, eager_decode_matmuls=hardware.decode_matmuls(tiny_cfg, 1))
    assert one.name == "fp32" and "at a decode batch of 1 row bf16 matmuls run at 0.33× fp32" in one.reason
    assert hardware.choose_dtype("auto", CPU).name == "bf16"  # training and scoring keep bf16
    assert Engine(random_model(tiny_cfg), decode_rows=1).dtype.name == "fp32"
    fake_probe(3.0, small=hardware.SLOW_SMALL_BF16 + 0.05)  # an EPYC: bf16 decodes faster eagerly
    assert Engine(random_model(tiny_cfg), decode_rows=1).dtype.name == "bf16"
    fake_probe(3.0, small=0.2)
    assert Engine(random_model(tiny_cfg), dtype="bf16", decode_rows=1).dtype.name == "bf16"  # asked for explicitly


def test_decode_matmuls_count_every_block_use_the_adapter_and_the_head(tiny_cfg):
    uses = tiny_cfg.n_prelude + tiny_cfg.mean_recur * tiny_cfg.n_shared + tiny_cfg.n_coda
    d, hidden = tiny_cfg.d_model, tiny_cfg.mlp_width
    assert hardware.decode_matmuls(tiny_cfg, 3) == {(3, d, d): 2 * uses, (3, d, hidden): uses, (3, hidden, d): uses,
                                                   (3, d, tiny_cfg.vocab_size): 1, (3, 2 * d, d): tiny_cfg.mean_recur}


def test_small_matmul_probe_times_both_dtypes_once_then_reads_the_cache(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURCHAT_HOME", str(tmp_path))
    matmuls = hardware.decode_matmuls(tiny_cfg, 1)
    seen = []
    monkeypatch.setattr(hardware, "best_seconds", lambda run, *a, **k: seen.append(run) or (len(seen) * 0.5))
    assert hardware.bf16_over_fp32_small_matmul(CPU, matmuls) == pytest.approx(0.5)  # fp32 0.5 s, bf16 1.0 s
    assert hardware.bf16_over_fp32_small_matmul(CPU, matmuls) == pytest.approx(0.5) and len(seen) == 2


def test_a_compiled_engine_decodes_its_batch_in_the_dtype_auto_picks_for_it(fake_probe, tiny_cfg):
    fake_probe(3.0)
    model = random_model(tiny_cfg)
    assert Engine(model, compile=True, decode_rows=1).dtype.name == "fp32"
    assert Engine(model, decode_rows=1).dtype.name == "bf16"  # eager: autocast caches the bf16 weights
    assert Engine(model, compile=True, decode_rows=hardware.COMPILED_FP32_ROWS + 1).dtype.name == "bf16"
    noisy = random_model(dataclasses.replace(tiny_cfg, state_init="noise"))  # stays eager under compile
    assert Engine(noisy, compile=True, decode_rows=1).dtype.name == "bf16"


def test_threads_flag_and_run_record(small_text, tmp_path):
    from recurchat.cli import main

    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert main(["train", "--preset", "cpu-smoke", "--quiet", "--data", str(small_text), "--out", str(out),
                     "--max-steps", "2", "--eval-every", "0", "--threads", "1", "--peak-flops", "2e9"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = rows[0]["run"]
    assert run["threads"] == 1 and run["peak_flops"] == 2e9 and run["peak_flops_source"] == "--peak-flops"
    for m in (r for r in rows if "loss" in r):
        assert m["mfu"] == pytest.approx(m["flops_per_token"] * m["tok_s"] / 2e9)


def test_every_command_defaults_to_auto():
    from recurchat.cli import build_parser

    parser = build_parser()
    assert TrainConfig().dtype == "auto"  # train and sft: the config field, with no preset overriding it
    assert all(p.train.dtype == "auto" for p in map(get_preset, ("cpu-smoke", "cpu-tiny", "gpu-d20")))
    assert parser.parse_args(["train", "--out", "x"]).dtype is None  # None = keep the config's
    for argv in (["eval", "--ckpt", "x"], ["sample", "--ckpt", "x"], ["chat", "--ckpt", "x"],
                 ["serve", "--ckpt", "x"], ["bench", "train"], ["speedrun", "--out", "x"]):
        assert parser.parse_args(argv).dtype == "auto", argv


def test_measuring_never_moves_the_global_rng(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURCHAT_HOME", str(tmp_path))  # an empty cache: everything is measured
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    choice = hardware.choose_dtype("auto", CPU)
    hardware.resolve_peak(CPU, choice, tiny_cfg, rows=64)
    assert torch.equal(torch.rand(4), expected)
