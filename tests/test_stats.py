"""Statistics against known values and independent implementations (scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from primekd.core.stats import (
    discordant_counts,
    holm_adjust,
    holm_within,
    mcnemar_exact_p,
    paired_bootstrap_ci,
    paired_comparison,
    summarize,
    wilson_interval,
)


def _pairs(only_a: int, only_b: int, both: int = 0, neither: int = 0) -> tuple[list, list]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize(("correct", "n"), [(0, 10), (7, 20), (10, 10), (500, 1319), (1, 1)])
def test_wilson_matches_scipy(correct: int, n: int) -> None:
    expected = binomtest(correct, n).proportion_ci(method="wilson")
    assert wilson_interval(correct, n) == pytest.approx((expected.low, expected.high))


def test_wilson_known_value_and_empty() -> None:
    # 7/20: p = 0.35, z = 1.95996; textbook Wilson interval (0.1812, 0.5671).
    lo, hi = wilson_interval(7, 20)
    assert (round(lo, 4), round(hi, 4)) == (0.1812, 0.5671)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_known_value() -> None:
    # 3 vs 10 discordant pairs: 2 * P(X <= 3), X ~ Bin(13, 1/2) = 2 * 378 / 8192.
    a, b = _pairs(3, 10, both=40, neither=7)
    assert mcnemar_exact_p(a, b) == pytest.approx(2 * 378 / 8192)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 20))
def test_mcnemar_is_binomial_on_discordant_pairs(only_a: int, only_b: int, both: int) -> None:
    a, b = _pairs(only_a, only_b, both)
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b).pvalue
    assert mcnemar_exact_p(a, b) == pytest.approx(expected)
    assert mcnemar_exact_p(b, a) == pytest.approx(expected)
    assert discordant_counts(a, b) == (only_a, only_b)


def test_holm_known_values() -> None:
    # sorted 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06; input order kept.
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5]) == [0.5]
    assert holm_adjust([0.4, 0.6]) == pytest.approx([0.8, 0.8])
    assert holm_adjust([]) == []


def test_bootstrap_is_seeded_and_close_to_the_normal_interval() -> None:
    rng = np.random.default_rng(7)
    a = list(rng.random(400) < 0.4)
    b = list(rng.random(400) < 0.5)
    low, high = paired_bootstrap_ci(a, b, n_resamples=2000, seed=3)
    assert (low, high) == paired_bootstrap_ci(a, b, n_resamples=2000, seed=3)
    d = np.asarray(b, float) - np.asarray(a, float)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(len(d))
    assert low == pytest.approx(d.mean() - half, abs=0.01)
    assert high == pytest.approx(d.mean() + half, abs=0.01)
    assert low < d.mean() < high


def test_bootstrap_degenerate_and_bad_input() -> None:
    same = [True, False, True]
    assert paired_bootstrap_ci(same, same) == (0.0, 0.0)
    assert paired_bootstrap_ci([True, True], [False, False]) == (-1.0, -1.0)
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap_ci([True], [True, False])


def test_summarize() -> None:
    summary = summarize([True, False, True, True], no_answer=1)
    assert summary == {
        "n": 4,
        "correct": 3,
        "accuracy": 0.75,
        "ci95": list(wilson_interval(3, 4)),
        "no_answer": 1,
    }
    assert summarize([])["accuracy"] == 0.0


def test_paired_comparison_is_the_parts_put_together() -> None:
    a = [True] * 10 + [False] * 30
    b = [True] * 4 + [False] * 6 + [True] * 12 + [False] * 18
    pair = paired_comparison(a, b, n_resamples=500, seed=3)
    assert (pair.n, pair.only_a, pair.only_b) == (40, 6, 12)
    assert pair.accuracy_a == 0.25 and pair.accuracy_b == 0.4
    assert pair.diff == pytest.approx(0.15)
    assert pair.ci95 == paired_bootstrap_ci(a, b, n_resamples=500, seed=3)
    assert pair.p == mcnemar_exact_p(a, b)
    assert paired_comparison([], []) is None
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])


def test_holm_within_adjusts_the_present_p_values_only() -> None:
    adjusted = holm_within([0.01, None, 0.04, 0.03])
    assert adjusted[1] is None
    assert adjusted[0] == pytest.approx(0.03) and adjusted[2] == pytest.approx(0.06)
    assert adjusted[3] == pytest.approx(0.06)
    assert holm_within([None]) == [None] and holm_within([]) == []
