"""Benchmark statistics on known data, and Mann-Whitney against scipy (a test-only oracle)."""

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from omnivox.bench.stats import compare, is_noise, mann_whitney_u, median_ci, ratio_ci, summarize


def test_summary_numbers_on_known_data():
    s = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s.n == 5
    assert s.mean == pytest.approx(4.0)
    assert s.std == pytest.approx(math.sqrt(12.5))  # ddof=1: sum of squares 50 / 4
    assert s.median == 3.0
    assert s.p95 == pytest.approx(8.8)  # linear between 4 and 10 at rank 3.8
    assert (s.min, s.max) == (1.0, 10.0)
    assert s.ci95_low <= s.median <= s.ci95_high
    assert 1.0 <= s.ci95_low and s.ci95_high <= 10.0


def test_summary_drops_non_finite_and_handles_empty():
    s = summarize([1.0, None, float("nan"), float("inf"), 3.0])
    assert s.n == 2 and s.median == 2.0
    empty = summarize([])
    assert empty.n == 0 and math.isnan(empty.median) and math.isnan(empty.ci95_low)
    one = summarize([0.5])
    assert one.n == 1 and math.isnan(one.std) and one.ci95_low == one.ci95_high == 0.5


def test_median_ci_is_seeded_contains_median_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(1.0, 0.2, 20)
    large = rng.normal(1.0, 0.2, 2000)
    assert median_ci(small) == median_ci(small)  # same data, same interval
    lo_s, hi_s = median_ci(small)
    lo_l, hi_l = median_ci(large)
    assert lo_s <= np.median(small) <= hi_s
    assert lo_l <= np.median(large) <= hi_l
    assert (hi_l - lo_l) < 0.3 * (hi_s - lo_s)
    assert lo_l < 1.0 < hi_l  # the true median


CASES = [
    ([1.2, 3.4, 2.2, 5.1, 0.3], [2.5, 6.1, 7.7, 4.4, 5.0, 6.6]),
    ([1, 2, 2, 3, 3, 3, 4], [3, 3, 4, 4, 5, 5, 5, 6]),  # many ties across both samples
    ([1, 1, 1, 2], [1, 2, 2, 2]),
    (list(range(30)), list(range(15, 45))),
    ([0.91, 0.94, 0.97, 1.02, 1.05, 0.99], [0.92, 0.95, 0.98, 1.01, 1.04, 1.0]),
    ([5.0], [1.0, 2.0, 3.0]),
]


@pytest.mark.parametrize("a,b", CASES)
def test_mann_whitney_matches_scipy_asymptotic(a, b):
    u, p = mann_whitney_u(a, b)
    ref = mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert u == pytest.approx(ref.statistic, abs=1e-12)
    assert abs(p - ref.pvalue) < 1e-9


def test_mann_whitney_random_against_scipy():
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = np.round(rng.normal(0, 1, rng.integers(3, 40)), 1)  # rounding makes ties
        b = np.round(rng.normal(0.3, 1, rng.integers(3, 40)), 1)
        ref = mannwhitneyu(a, b, method="asymptotic")
        u, p = mann_whitney_u(a, b)
        assert u == pytest.approx(ref.statistic) and abs(p - ref.pvalue) < 1e-9


def test_mann_whitney_all_equal_is_p_one():
    assert mann_whitney_u([2, 2, 2], [2, 2]) == (3.0, 1.0)


def test_ratio_ci_identical_vs_shifted():
    rng = np.random.default_rng(3)
    a = rng.normal(1.0, 0.05, 60)
    ratio, low, high = ratio_ci(a, a.copy())
    assert ratio == 1.0 and low < 1.0 < high
    b = a * 0.8
    ratio, low, high = ratio_ci(a, b)
    assert ratio == pytest.approx(0.8) and low < 0.8 < high and high < 1.0
    assert ratio_ci(a, b) == ratio_ci(a, b)  # seeded


def test_is_noise_rule():
    assert is_noise(0.9, 1.1, 0.001)  # CI contains 1
    assert is_noise(0.7, 0.9, 0.05)  # p not below 0.05
    assert not is_noise(0.7, 0.9, 0.01)
    assert not is_noise(1.1, 1.3, 0.01)
    assert is_noise(0.7, 0.9, float("nan"))


def test_compare_verdicts():
    rng = np.random.default_rng(5)
    a = rng.normal(1.0, 0.05, 30)
    assert compare(a, a * 0.7).verdict == "faster"
    assert compare(a, a * 1.3).verdict == "slower"
    assert compare(a, rng.permutation(a)).verdict == "noise"
    tiny = compare([1.0, 1.1], [0.5, 0.6])  # a big ratio on two points each is still not significant
    assert tiny.verdict == "noise" and tiny.p_value >= 0.05
