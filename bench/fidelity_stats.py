"""The statistics of the fidelity study: intervals, tests, detectable differences, verdicts.

Pure functions over lists of per-seed scores (one number per seed), so they are tested on
hand-made numbers. What the study reports with them (bench/fidelity.py):

* ``interval``: mean, sample standard deviation and the two-sided 95% Student-t interval of
  the mean over seeds;
* ``welch``: Welch's two-sample t-test (unequal variances). Seeds are not paired: a seed
  initialises two variants' different parameter sets differently, so seed ``s`` of one variant
  has no special relation to seed ``s`` of another;
* ``holm``: Holm-Bonferroni adjusted p-values over one family of comparisons;
* ``detectable_difference``: the smallest true difference the two-sided Welch test at level
  ``alpha`` finds with probability ``power``, given the two samples' spreads and sizes (the
  normal-approximation formula with Student-t quantiles at the Welch degrees of freedom);
* ``verdict``: a claim "A > B" checked three ways: ``agrees`` (significant in the claimed
  direction), ``tie`` (not significant), ``disagrees`` (significant the other way).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Interval:
    mean: float
    std: float
    low: float
    high: float
    n: int


def interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean, std and the Student-t interval of the mean (zero width for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, 0.0, mean, mean, n)
    std = statistics.stdev(values)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


@dataclass(frozen=True)
class Test:
    diff: float
    """mean(a) - mean(b)."""
    t: float
    df: float
    p: float


def _welch_df(va: float, na: int, vb: float, nb: int) -> float:
    sa, sb = va / na, vb / nb
    denominator = (sa * sa / (na - 1) if na > 1 else 0.0) + (sb * sb / (nb - 1) if nb > 1 else 0.0)
    return (sa + sb) ** 2 / denominator if denominator > 0 else float(na + nb - 2)


def welch(a: Sequence[float], b: Sequence[float]) -> Test:
    """Welch's t-test of mean(a) != mean(b). Two constant samples: p is 0 when they differ (every
    seed gives the same gap) and 1 when they are equal."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 values per sample, got {len(a)} and {len(b)}")
    diff = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a), statistics.variance(b)
    if va == 0 and vb == 0:
        return Test(diff, math.copysign(math.inf, diff) if diff else 0.0, float(len(a) + len(b) - 2),
                    0.0 if diff else 1.0)
    result = stats.ttest_ind(a, b, equal_var=False)
    return Test(diff, float(result.statistic), _welch_df(va, len(a), vb, len(b)), float(result.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (monotone, capped at 1)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def detectable_difference(sd_a: float, n_a: int, sd_b: float, n_b: int, alpha: float = ALPHA,
                          power: float = POWER) -> float:
    """Smallest |mean difference| a two-sided Welch test at ``alpha`` detects with ``power``."""
    va, vb = sd_a ** 2, sd_b ** 2
    se = math.sqrt(va / n_a + vb / n_b)
    df = _welch_df(va, n_a, vb, n_b) if se > 0 else float(n_a + n_b - 2)
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se


def verdict(diff: float, p: float, alpha: float = ALPHA) -> str:
    """The claim "first > second", for a measured ``diff`` = first - second with p-value ``p``."""
    if p >= alpha:
        return "tie"
    return "agrees" if diff > 0 else "disagrees"
