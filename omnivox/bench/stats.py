"""Statistics for benchmark samples (numpy only).

Runs of the same configuration drift by tens of percent (shared/docs/official-baseline.md), so a mean and a std
are not enough to call one configuration faster: we report medians with bootstrap confidence intervals and
compare two runs with a ratio-of-medians interval plus a Mann-Whitney U test. Every bootstrap is seeded so the
same samples always print the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
ALPHA = 0.05
_BATCH = 250  # resamples drawn at once: bounds memory at _BATCH x n floats for large load tests


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample std (ddof=1); NaN for n < 2
    median: float
    p95: float  # linear interpolation between order statistics (numpy's default)
    ci95_low: float  # 95 % bootstrap percentile interval of the MEDIAN (2000 seeded resamples)
    ci95_high: float
    min: float
    max: float


def finite(values: Iterable[float | None]) -> np.ndarray:
    """float64 array of the finite values: failed requests carry None/NaN/inf and are counted elsewhere."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return x[np.isfinite(x)]


def _bootstrap(stat, samples: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """`stat(*resampled)` for `resamples` seeded resamples with replacement, each sample resampled independently."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, _BATCH):
        size = min(_BATCH, resamples - start)
        drawn = [x[rng.integers(0, len(x), size=(size, len(x)))] for x in samples]
        out.append(stat(*drawn))
    return np.concatenate(out)


def median_ci(values: Iterable[float | None], level: float = 0.95, resamples: int = RESAMPLES,
              seed: int = SEED) -> tuple[float, float]:
    """Bootstrap percentile interval of the median: resample with replacement, take the middle `level` of the
    resampled medians. Percentile (not BCa) because the median's bootstrap distribution is lumpy for small n."""
    x = finite(values)
    if len(x) == 0:
        return math.nan, math.nan
    medians = _bootstrap(lambda d: np.median(d, axis=1), [x], resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


def summarize(values: Iterable[float | None]) -> Summary:
    """Summary of the finite values (non-finite ones are dropped); all-NaN Summary with n=0 when none are left."""
    x = finite(values)
    if len(x) == 0:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan, nan, nan, nan)
    low, high = median_ci(x)
    return Summary(
        n=len(x),
        mean=float(x.mean()),
        std=float(x.std(ddof=1)) if len(x) > 1 else math.nan,
        median=float(np.median(x)),
        p95=float(np.percentile(x, 95)),
        ci95_low=low,
        ci95_high=high,
        min=float(x.min()),
        max=float(x.max()),
    )


def ratio_ci(a: Iterable[float | None], b: Iterable[float | None], level: float = 0.95,
             resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """(median(b) / median(a), low, high): seeded bootstrap percentile interval of the ratio of medians, a and b
    resampled independently. Below 1 means b is lower (faster, for times and RTF)."""
    x, y = finite(a), finite(b)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("ratio_ci needs at least one finite value in each sample")
    with np.errstate(divide="ignore", invalid="ignore"):  # a median of 0 (an unused stage) gives inf/NaN, not noise
        ratios = _bootstrap(lambda da, db: np.median(db, axis=1) / np.median(da, axis=1), [x, y], resamples, seed)
        ratio = np.float64(np.median(y)) / np.float64(np.median(x))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(ratio), float(low), float(high)


def _average_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n with ties given their average rank, and the size of each group of equal values."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    average = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each distinct value
    return average[inverse], counts


def mann_whitney_u(a: Iterable[float | None], b: Iterable[float | None]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test, normal approximation with tie and continuity corrections.

    Returns (U of `a`, p). Same definitions as scipy.stats.mannwhitneyu(a, b, method="asymptotic"): U1 = R1 -
    n1(n1+1)/2, z = (max(U1, U2) - n1 n2 / 2 - 0.5) / sigma with the tie-corrected sigma, p = 2 * P(Z > z),
    clipped to [0, 1]. Rank based, so one slow outlier cannot decide the verdict the way it moves a mean.
    """
    x, y = finite(a), finite(b)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_u needs at least one finite value in each sample")
    ranks, ties = _average_ranks(np.concatenate([x, y]))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    u = max(u1, n1 * n2 - u1)
    n = n1 + n2
    tie_term = float(np.sum(ties.astype(np.float64) ** 3 - ties))
    variance = n1 * n2 / 12 * ((n + 1) - (tie_term / (n * (n - 1)) if n > 1 else 0.0))
    if variance <= 0:  # every value equal: no evidence of a difference
        return u1, 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    p = math.erfc(z / math.sqrt(2))  # = 2 * P(Z > z)
    return u1, min(max(p, 0.0), 1.0)


def is_noise(ratio_low: float, ratio_high: float, p_value: float, alpha: float = ALPHA) -> bool:
    """The rule for calling a difference noise: it is noise when the ratio CI contains 1 (low <= 1 <= high) OR
    the Mann-Whitney p >= alpha (0.05). Only a difference that passes both is reported as faster or slower."""
    return (ratio_low <= 1.0 <= ratio_high) or not (p_value < alpha)


@dataclass(frozen=True)
class Comparison:
    ratio: float  # median(b) / median(a)
    ratio_low: float
    ratio_high: float
    p_value: float
    verdict: str  # "faster" | "slower" | "noise" (for b relative to a; lower is better)


def compare(a: Iterable[float | None], b: Iterable[float | None], alpha: float = ALPHA) -> Comparison:
    """Compare b against a for a lower-is-better metric (times, RTF) with the `is_noise` rule."""
    a, b = finite(a), finite(b)
    ratio, low, high = ratio_ci(a, b)
    _, p = mann_whitney_u(a, b)
    verdict = "noise" if is_noise(low, high, p, alpha) else ("faster" if ratio < 1 else "slower")
    return Comparison(ratio, low, high, p, verdict)
