"""Depth samplers: mean, clamp, determinism by (seed, step), curriculum. Run: `pytest tests/model/test_depth.py`."""

import pytest

from recurchat.errors import UserError
from recurchat.model.depth import DepthSampler


@pytest.mark.parametrize("mean", [2, 4, 8])
def test_poisson_lognormal_mean_is_rbar(mean):
    s = DepthSampler("poisson-lognormal", mean=mean, r_max=8 * mean, sigma=0.5, seed=1)
    draws = s.sample(step=0, n=200_000)
    avg = sum(draws) / len(draws)
    assert abs(avg - mean) / mean < 0.02, avg
    assert min(draws) >= 1


def test_clamp_and_sigma_from_spec():
    s = DepthSampler("poisson-lognormal:1.0", mean=8, r_max=10, seed=0)
    assert s.sigma == 1.0
    draws = s.sample(0, 50_000)
    assert max(draws) == 10 and min(draws) >= 1
    assert sum(d == 10 for d in draws) > 0


def test_deterministic_by_seed_and_step():
    a = DepthSampler("poisson-lognormal", mean=4, r_max=16, seed=3)
    b = DepthSampler("poisson-lognormal", mean=4, r_max=16, seed=3)
    assert [a.sample(t, 4) for t in range(50)] == [b.sample(t, 4) for t in range(50)]
    # order of queries does not matter (a resumed run starting at step 25 sees the same draws)
    assert b.sample(25, 4) == a.sample(25, 4)
    c = DepthSampler("poisson-lognormal", mean=4, r_max=16, seed=4)
    assert [a.sample(t) for t in range(50)] != [c.sample(t) for t in range(50)]
    assert len({tuple(a.sample(t, 4)) for t in range(50)}) > 10


def test_fixed():
    assert DepthSampler("fixed", mean=4, r_max=16).sample(3, 2) == [4, 4]
    assert DepthSampler("fixed:7", mean=4, r_max=16).sample(3) == [7]


def test_curriculum_ramps_mean():
    s = DepthSampler("poisson-lognormal", mean=8, r_max=32, seed=0, curriculum_steps=100)
    assert s.mean_at(0) == 1.0 and s.mean_at(50) == pytest.approx(4.5) and s.mean_at(100) == 8
    assert s.sample(0, 100) == [1] * 100
    early = sum(s.sample(10, 20_000)) / 20_000
    late = sum(s.sample(200, 20_000)) / 20_000
    assert early < late and abs(late - 8) / 8 < 0.03


@pytest.mark.parametrize("spec,mean,rmax", [("fixed:0", 4, 8), ("fixed:9", 4, 8), ("uniform", 4, 8),
                                            ("poisson-lognormal", 4, 0), ("fixed:x", 4, 8)])
def test_bad_specs(spec, mean, rmax):
    with pytest.raises(UserError):
        DepthSampler(spec, mean=mean, r_max=rmax)
