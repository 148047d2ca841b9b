"""`recurchat retrofit`: kept layers as prelude / shared stack / coda, exact at r = 1, healed by the trainer.

Run: `pytest tests/interop/test_retrofit.py`.
"""

import pytest
import torch

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.interop.retrofit import default_spans


def logits(run, x, r=None):
    _, model = checkpoint.load_model(run, "cpu")
    with torch.no_grad():
        return model(x, num_recur=r)


@pytest.fixture(scope="module")
def retrofitted(imported_llama, tmp_path_factory):
    run, _, ref = imported_llama
    out = tmp_path_factory.mktemp("retro")
    spans = ["--prelude", "0-0", "--shared", "1-2", "--coda", "3-3"]
    assert main(["retrofit", "--ckpt", str(run), "--out", str(out / "loop"), *spans, "--mean-recur", "2",
                 "--seq-len", "64"]) == 0
    assert main(["retrofit", "--ckpt", str(run), "--out", str(out / "control"), *spans, "--standard",
                 "iso-params", "--seq-len", "64"]) == 0
    return run, out / "loop", out / "control", ref


def test_at_r_1_the_retrofit_computes_the_source_and_more_iterations_change_it(retrofitted):
    source, loop, control, ref = retrofitted
    x = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    base = logits(source, x)
    assert torch.allclose(logits(loop, x, 1), base, atol=1e-5)
    assert torch.allclose(logits(control, x), base, atol=1e-5)
    assert (logits(loop, x, 2) - base).abs().max() > 1e-2
    cfg = checkpoint.load(loop).model_cfg
    assert (cfg.n_prelude, cfg.n_shared, cfg.n_coda, cfg.adapter_init, cfg.state_norm) == (1, 2, 1, "s", False)
    assert checkpoint.load(control).model_cfg.n_shared == 0


def test_dropped_layers_are_gone_and_kept_ones_keep_their_weights(imported_llama, tmp_path):
    run, _, _ = imported_llama
    assert main(["retrofit", "--ckpt", str(run), "--out", str(tmp_path / "r"), "--prelude", "0-0", "--shared",
                 "2-2", "--coda", "3-3"]) == 0
    src, got = checkpoint.load(run).weights, checkpoint.load(tmp_path / "r").weights
    for ours, theirs in (("prelude.0", "prelude.0"), ("recur.0", "prelude.2"), ("coda.0", "prelude.3")):
        assert torch.equal(got[f"{ours}.mlp.c_fc.weight"], src[f"{theirs}.mlp.c_fc.weight"])
    assert not any(k.startswith(("prelude.1.", "recur.1.", "coda.1.")) for k in got)  # block 1 dropped


@pytest.mark.parametrize("spans, problem", [
    (["--prelude", "0-1", "--shared", "1-2", "--coda", "3-3"], "in order and disjoint"),
    (["--prelude", "0-0", "--shared", "1-2", "--coda", "3-4"], "the source has blocks 0-3"),
    (["--prelude", "1-0"], "need 0 <= A <= B"),
    (["--shared", "x"], "expected A-B"),
])
def test_bad_spans_are_one_line_errors(imported_llama, tmp_path, capsys, spans, problem):
    run, _, _ = imported_llama
    assert main(["retrofit", "--ckpt", str(run), "--out", str(tmp_path / "r"), *spans]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_default_spans_follow_mcleish_proportions():
    assert default_spans(22) == {"prelude": (0, 3), "shared": (10, 17), "coda": (18, 21)}  # TinyLlama's 4-8-4
    assert default_spans(30) == {"prelude": (0, 4), "shared": (14, 24), "coda": (25, 29)}  # SmolLM2-135M


def test_a_recursive_source_is_refused(retrofitted, tmp_path, capsys):
    _, loop, _, _ = retrofitted
    assert main(["retrofit", "--ckpt", str(loop), "--out", str(tmp_path / "again")]) == 2
    assert "already recursive" in capsys.readouterr().err


def test_heal_trains_the_retrofit_from_its_weights_with_its_settings(retrofitted, tmp_path, small_text):
    _, loop, _, _ = retrofitted
    healed = tmp_path / "healed"
    assert main(["train", "--init-from", str(loop), "--out", str(healed), "--data", str(small_text), "--max-steps",
                 "3", "--eval-every", "0", "--quiet", "--batch-size", "2", "--total-batch-tokens", "128"]) == 0
    before, after = checkpoint.load(loop), checkpoint.load(healed)
    assert after.model_cfg == before.model_cfg and after.train_cfg.curriculum_frac == 0.25
    assert after.tokenizer.fingerprint() == before.tokenizer.fingerprint()
    moved = (after.weights["adapter.proj.weight"] - before.weights["adapter.proj.weight"]).abs().max()
    assert moved > 0
