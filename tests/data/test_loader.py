"""Training batches (shapes, shift, determinism, exact resume, rank sharding) and evaluation windows.

Run: `pytest tests/data/test_loader.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recurchat.data.loader import TokenLoader, eval_batch_count, eval_batches
from recurchat.errors import UserError

T = 16


@pytest.fixture
def stream() -> np.ndarray:
    # Distinct values make every window identifiable; uint16 like the real caches.
    return np.arange(1, 50 * T + 2, dtype=np.uint16)  # 50 rows of T+1


def _take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_shapes_dtype_and_shift(stream):
    x, y = TokenLoader(stream, batch_size=4, seq_len=T).next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every row is a window starting on a multiple of T (stride T, rows of T+1 tokens).
    assert bool(((x[:, 0] - 1) % T == 0).all())
    assert torch.equal(y, x + 1)


def test_deterministic_per_seed_and_epochs_cover_rows(stream):
    a = _take(TokenLoader(stream, 5, T, seed=3), 30)
    b = _take(TokenLoader(stream, 5, T, seed=3), 30)
    c = _take(TokenLoader(stream, 5, T, seed=4), 30)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    # 50 rows / 5 per batch = 10 batches per epoch, each visiting every row once, in a new order each epoch.
    epochs = [torch.cat([x for x, _ in a[i : i + 10]])[:, 0] for i in (0, 10, 20)]
    for starts in epochs:
        assert sorted(starts.tolist()) == [1 + i * T for i in range(50)]
    assert not torch.equal(epochs[0], epochs[1])


def test_resume_from_state_dict_is_exact(stream):
    loader = TokenLoader(stream, 3, T, seed=7)
    _take(loader, 20)  # crosses an epoch boundary (16 batches of 3 rows per epoch, 2 rows skipped)
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    expected = _take(loader, 25)
    resumed = TokenLoader(stream, 3, T, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    got = _take(resumed, 25)
    assert all(torch.equal(xe, xg) and torch.equal(ye, yg) for (xe, ye), (xg, yg) in zip(expected, got))


def test_two_ranks_see_what_one_rank_with_double_batch_sees(stream):
    single = TokenLoader(stream, 4, T, seed=1)
    ranks = [TokenLoader(stream, 2, T, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):
        x1, y1 = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x1, torch.cat([p[0] for p in parts]))
        assert torch.equal(y1, torch.cat([p[1] for p in parts]))
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_state_written_on_two_ranks_resumes_on_one(stream):
    ranks = [TokenLoader(stream, 2, T, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        for r in ranks:
            r.next_batch()
    single = TokenLoader(stream, 4, T)
    single.load_state_dict(ranks[0].state_dict())
    for _ in range(10):
        x1, _ = single.next_batch()
        assert torch.equal(x1, torch.cat([r.next_batch()[0] for r in ranks]))


def test_incompatible_resume_and_short_stream_are_user_errors(stream):
    state = TokenLoader(stream, 4, T).state_dict()
    with pytest.raises(UserError, match="global batch"):
        TokenLoader(stream, 2, T).load_state_dict(state)
    with pytest.raises(UserError, match="seq_len"):
        TokenLoader(stream, 4, T // 2).load_state_dict(state)
    with pytest.raises(UserError, match="data changed"):
        TokenLoader(stream[: 30 * T + 1], 4, T).load_state_dict(state)
    with pytest.raises(UserError, match=r"need 1,025 tokens .*have 801"):
        TokenLoader(stream, 8, T, world_size=8)


def test_eval_batches_cover_targets_exactly_once(stream):
    n = len(stream) - 1
    for max_tokens in (None, 5 * T, 7 * T + 3, 3, 10 * n):
        batches = list(eval_batches(stream, 4, T, max_tokens))
        covered = n if max_tokens is None else min(max_tokens, n)
        assert len(batches) == eval_batch_count(len(stream), 4, T, max_tokens)
        ys = torch.cat([y.flatten() for _, y in batches])
        assert torch.equal(ys, torch.from_numpy(stream[1 : covered + 1].astype(np.int64)))
        for x, y in batches:
            assert x.shape == y.shape and x.shape[0] <= 4 and x.shape[1] <= T
            assert torch.equal(y, x + 1)
    assert [x.shape for x, _ in eval_batches(stream, 4, T, 7 * T + 3)] == [(4, T), (3, T), (1, 3)]
    # Deterministic: same windows every call.
    a, b = list(eval_batches(stream, 4, T, None)), list(eval_batches(stream, 4, T, None))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    with pytest.raises(UserError, match="too short"):
        list(eval_batches(stream[:1], 4, T, None))


def test_loader_reads_a_memmap(tmp_path, stream):
    path = tmp_path / "tokens.bin"
    stream.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, _ = TokenLoader(mm, 2, T, seed=1).next_batch()
    x_ref, _ = TokenLoader(stream, 2, T, seed=1).next_batch()
    assert torch.equal(x, x_ref)
