"""Shared fixtures: tiny configs and an isolated $RECURCHAT_HOME per test session. Run: `pytest`."""

import os

import pytest
import torch

from recurchat.config import ModelConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=256 + 64, d_model=64, n_head=4, n_kv_head=2, n_prelude=1, n_shared=2, n_coda=1,
                       mean_recur=3, r_max=8, seq_len=32)


@pytest.fixture(autouse=True, scope="session")
def recurchat_home(tmp_path_factory):
    """Token caches of the embedded corpus are shared across tests of one session, never with the user's home."""
    home = os.environ.get("RECURCHAT_TEST_HOME") or str(tmp_path_factory.mktemp("recurchat_home"))
    old = os.environ.get("RECURCHAT_HOME")
    os.environ["RECURCHAT_HOME"] = home
    yield home
    if old is None:
        os.environ.pop("RECURCHAT_HOME", None)
    else:
        os.environ["RECURCHAT_HOME"] = old


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    """A real ~150 kB text file (Python's own reference docs) for quick end-to-end runs."""
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("data") / "pydoc.txt"
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    path.write_text(text[:150_000], encoding="utf-8")
    return path
