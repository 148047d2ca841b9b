"""Helpers shared by test modules (importable because tests/conftest.py puts tests/ on sys.path).

Used by `pytest tests/infer tests/eval`.
"""

import pytest
import torch

from recurchat.config import ModelConfig
from recurchat.model.recurrent import RecurrentLM


def smoke_run(tmp_path, small_text, steps: int = 4):
    """A cpu-smoke run directory trained for `steps` steps on `small_text` (no validation): a real checkpoint."""
    from recurchat.cli import main

    run = tmp_path / "smoke"
    assert main(["train", "--preset", "cpu-smoke", "--quiet", "--data", str(small_text), "--out", str(run),
                 "--max-steps", str(steps), "--eval-every", "0"]) == 0
    return run


def perturbed(model: RecurrentLM, seed: int | None = None) -> RecurrentLM:
    """Noise on the output projections and the adapter, a wide head: depth then changes the logits (recurchat's
    init, and a few training steps, leave r nearly a no-op). `seed` None draws from the current RNG."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "adapter" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "lm_head" in name:
                p.normal_(0, 0.3)
    return model.eval()


def random_model(cfg: ModelConfig, seed: int = 0) -> RecurrentLM:
    """Random weights with non-zero output projections, so depth changes the logits."""
    torch.manual_seed(seed)
    return perturbed(RecurrentLM(cfg))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, and two threads on a shared 2-core box spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
