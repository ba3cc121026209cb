"""The gate's statistics: exact where they can be, calibrated where they are not."""

import itertools
import math

import numpy as np
import pytest

from moebench.bench import stats


def brute_signed_rank_cdf(n):
    sums = [sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s)
            for signs in itertools.product([0, 1], repeat=n)]  # fmt: skip
    counts = np.bincount(sums, minlength=n * (n + 1) // 2 + 1)
    return np.cumsum(counts) / 2**n


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_signed_rank_null_distribution_is_exact(n):
    np.testing.assert_allclose(stats._signed_rank_cdf(n), brute_signed_rank_cdf(n), atol=1e-15)


def test_signed_rank_normal_tail_matches_the_exact_one(monkeypatch):
    exact = stats._signed_rank_cdf(60)
    monkeypatch.setattr(stats, "EXACT_BLOCKS", 20)
    np.testing.assert_allclose(stats._signed_rank_cdf(60), exact, atol=5e-3)


def test_all_blocks_slower_is_the_smallest_p_value():
    e = stats.signed_rank([0.1, 0.2, 0.05, 0.3, 0.15])
    assert e.p_slower == pytest.approx(1 / 32) and e.p_faster == 1.0
    assert 0.05 <= e.estimate <= 0.3 and e.n == 5
    # Five blocks cannot give a 95 % interval: it is unbounded, not made up.
    assert (e.low, e.high) == (-math.inf, math.inf)


def test_one_outlier_moves_the_signed_rank_estimate_by_little():
    rng = np.random.default_rng(0)
    x = rng.normal(0.1, 0.01, 24)
    with_outlier = np.r_[x[:-1], -0.7]
    a, b = stats.signed_rank(x), stats.signed_rank(with_outlier)
    assert abs(a.estimate - b.estimate) < 0.01 and b.p_slower < 1e-4


@pytest.mark.parametrize("test", ["signed_rank", "two_sample"])
def test_p_values_are_calibrated_and_intervals_cover(test):
    """Under the null, p < 0.05 about 5 % of the time; a 95 % interval covers the true
    shift about 95 % of the time; and the interval excludes 0 exactly when the matching
    one-sided p-value is under 2.5 %."""
    rng = np.random.default_rng(1)
    alarms, covered = 0, 0
    trials = 600
    for _ in range(trials):
        if test == "signed_rank":
            null = stats.signed_rank(rng.standard_normal(16))
            shifted = stats.signed_rank(rng.standard_normal(16) + 0.3)
        else:
            a = np.exp(rng.standard_normal(20))
            null = stats.two_sample(a, np.exp(rng.standard_normal(20)))
            shifted = stats.two_sample(a, np.exp(rng.standard_normal(20) + 0.3))
        alarms += null.p_slower < 0.05
        covered += shifted.low <= 0.3 <= shifted.high
        for e in (null, shifted):
            assert (e.low > 0) == (e.p_slower <= 0.025) or abs(e.p_slower - 0.025) < 0.01
    assert 0.03 < alarms / trials < 0.075
    assert 0.92 < covered / trials < 0.985


def test_two_sample_estimates_a_uniform_ratio():
    rng = np.random.default_rng(2)
    base = rng.uniform(9, 11, 40)
    e = stats.two_sample(base, base * 1.25)
    assert e.estimate == pytest.approx(math.log(1.25), abs=0.03)
    assert e.p_slower < 1e-6 and e.low > math.log(1.1)
    # Medians alone (a run without repeats): an estimate, no test.
    e = stats.two_sample([10.0], [12.0])
    assert e.estimate == pytest.approx(math.log(1.2)) and math.isnan(e.p_slower)
    assert (e.low, e.high) == (-math.inf, math.inf)


def test_two_sample_thins_long_runs_in_time_order():
    base = np.r_[np.full(500, 10.0), np.full(500, 20.0)]
    e = stats.two_sample(base, base)
    assert e.n == stats.MAX_REPEATS and e.estimate == 0.0


def test_benjamini_hochberg_adjusts_as_the_paper_does():
    adjusted = stats.bh_adjust([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(adjusted, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert len(stats.bh_adjust([])) == 0
    assert (stats.bh_adjust([0.9] * 5) == 0.9).all()
    # No test (NaN) is not counted: the same adjustment with NaNs among the p-values.
    with_gaps = stats.bh_adjust([0.01, math.nan, 0.04, 0.03, 0.5, math.nan])
    np.testing.assert_allclose(with_gaps[[0, 2, 3, 4]], adjusted)
    assert np.isnan(with_gaps[[1, 5]]).all()
