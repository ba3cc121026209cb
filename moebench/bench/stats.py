"""The gate's statistics: rank tests, their intervals, and the false discovery rate.

Effects are log time ratios, log(candidate / baseline): a slowdown and the matching
speed-up weigh the same, and points of any size can be pooled. Every test is a rank test
with the Hodges-Lehmann estimate and the interval that inverts it, so that an estimate,
its interval and its p-value always agree, and one preempted repeat or one busy round
moves none of them by more than one rank.

- `two_sample`: one point in one round, the two sides' raw repeats (Mann-Whitney).
- `signed_rank`: paired effects, one a block, for an aggregate over many points (Wilcoxon).
  Under the null hypothesis of identical code, which side is slower in a block is a coin
  toss, and that holds on a loaded machine too, where a t-test's normality does not.
- `bh_adjust`: p-values adjusted over a gate's many tests, so that calling those below q
  holds the expected share of false alarms among the calls at q.

numpy only: scipy is not among moebench's dependencies.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np

# Repeats used per side and round: the two-sample interval sorts n x m differences.
MAX_REPEATS = 250
# Above this many blocks the signed-rank null distribution is taken as normal.
EXACT_BLOCKS = 400


@dataclasses.dataclass(frozen=True)
class Effect:
    """A log ratio's estimate, its two-sided interval, and the one-sided p-values that the
    candidate is slower (p_slower) or faster (p_faster); n: repeats or blocks behind it."""

    estimate: float
    low: float
    high: float
    p_slower: float
    p_faster: float
    n: int

    @classmethod
    def unknown(cls, n: int = 0) -> Effect:
        """Nothing to test: no estimate, an unbounded interval, no p-values (NaN)."""
        return cls(math.nan, -math.inf, math.inf, math.nan, math.nan, n)


def _thin(x: np.ndarray) -> np.ndarray:
    """At most MAX_REPEATS of x, evenly spaced in the order they were taken."""
    step = math.ceil(len(x) / MAX_REPEATS)
    return x[::step]


def two_sample(base_ms, cand_ms, *, level: float = 0.95) -> Effect:
    """The shift of log time from the baseline's repeats to the candidate's: the median of
    all pairwise differences, its distribution-free interval, and Mann-Whitney p-values
    (normal approximation with tie and continuity corrections). With fewer than 3 repeats a
    side (a run that kept only medians) there is an estimate but no test."""
    a = np.log(_thin(np.asarray(base_ms, float)))
    b = np.log(_thin(np.asarray(cand_ms, float)))
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return Effect.unknown()
    diffs = np.sort((b[None, :] - a[:, None]).ravel())
    estimate = float(np.median(diffs))
    if n < 3 or m < 3:
        return dataclasses.replace(Effect.unknown(min(n, m)), estimate=estimate)
    both = np.concatenate([a, b])
    u = _ranks(both)[n:].sum() - m * (m + 1) / 2  # pairs in which the candidate is slower
    _, ties = np.unique(both, return_counts=True)
    var = n * m / 12 * ((n + m + 1) - (ties**3 - ties).sum() / ((n + m) * (n + m - 1)))
    sd = math.sqrt(max(var, 1e-300))
    p_slower = _upper((u - n * m / 2 - 0.5) / sd)
    p_faster = _upper((n * m / 2 - u - 0.5) / sd)
    # The interval: the differences ranked c from either end, c from U's critical value.
    c = math.floor(n * m / 2 - NormalDist().inv_cdf(1 - (1 - level) / 2) * sd)
    low, high = (diffs[c - 1], diffs[-c]) if c >= 1 else (-math.inf, math.inf)
    return Effect(estimate, float(low), float(high), p_slower, p_faster, min(n, m))


def signed_rank(blocks, *, level: float = 0.95) -> Effect:
    """Paired log ratios, one a block: the median of their pairwise means (Walsh
    averages), its interval, and the Wilcoxon signed-rank p-values (exact up to
    EXACT_BLOCKS blocks; ranks tied by order, zeros dropped as Wilcoxon does)."""
    x = np.asarray(blocks, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return Effect.unknown()
    i, j = np.triu_indices(len(x))
    walsh = np.sort((x[i] + x[j]) / 2)
    estimate = float(np.median(walsh))
    nonzero = x[x != 0]
    n = len(nonzero)
    if n == 0:
        return Effect(estimate, estimate, estimate, 1.0, 1.0, len(x))
    ranks = np.empty(n)
    ranks[np.argsort(np.abs(nonzero), kind="stable")] = np.arange(1, n + 1)
    w = int(ranks[nonzero > 0].sum())
    cdf = _signed_rank_cdf(n)  # cdf[t] = P(W <= t) under the null
    p_slower = 1.0 - (cdf[w - 1] if w > 0 else 0.0)
    p_faster = float(cdf[w])
    # The largest c with P(W <= c) <= (1 - level) / 2: the interval drops c Walsh averages
    # at each end (of all blocks, zeros included, as the averages are).
    c = int(np.searchsorted(_signed_rank_cdf(len(x)), (1 - level) / 2, side="right")) - 1
    low, high = (walsh[c], walsh[-c - 1]) if c >= 0 else (-math.inf, math.inf)
    return Effect(estimate, float(low), float(high), float(p_slower), p_faster, len(x))


def _signed_rank_cdf(n: int) -> np.ndarray:
    """P(W <= t) for t = 0..n(n+1)/2, W the sum of the ranks 1..n given a + sign each with
    probability 1/2: exact by dynamic programming, normal beyond EXACT_BLOCKS."""
    total = n * (n + 1) // 2
    if n > EXACT_BLOCKS:
        mean, sd = total / 2, math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
        z = (np.arange(total + 1) + 0.5 - mean) / (sd * math.sqrt(2))
        return 0.5 * (1 + np.vectorize(math.erf)(z))
    pmf = np.zeros(total + 1)
    pmf[0] = 1.0
    for r in range(1, n + 1):  # rank r joins with a + sign (shifted by r) or a - sign
        shifted = np.zeros_like(pmf)
        shifted[r:] = pmf[:-r]
        pmf = 0.5 * (pmf + shifted)
    return np.cumsum(pmf)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _upper(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def bh_adjust(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values: calling those <= q keeps the expected share
    of false calls among all calls at most q (Benjamini and Hochberg, 1995). NaN (no test)
    stays NaN and does not count as a test."""
    p = np.asarray(p_values, float)
    adjusted = np.full(len(p), math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return adjusted
