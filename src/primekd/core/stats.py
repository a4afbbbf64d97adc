"""Statistics for accuracy: Wilson intervals, and paired comparisons of two graders' runs.

Paired comparisons take two equally long sequences of per-question correctness flags
(question i of `a` is question i of `b`). Differences are `b - a`, as fractions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the accuracy `correct / n`; (0, 1) when n is 0.

    The closed form (as statsmodels' `proportion_confint(method="wilson")` computes it, which
    the tests check), so that `eval` needs no scipy/statsmodels: a GPU box with only torch
    and transformers runs it (bench/gpu_check.sh)."""
    from statistics import NormalDist

    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def summarize(correct_flags: Sequence[bool], no_answer: int = 0) -> dict[str, Any]:
    """The accuracy summary every command reports: n, correct, accuracy, ci95, no_answer."""
    n = len(correct_flags)
    correct = int(sum(bool(flag) for flag in correct_flags))
    lo, hi = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": [lo, hi],
        "no_answer": int(no_answer),
    }


def discordant_counts(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(questions only `a` got right, questions only `b` got right)."""
    _check_paired(a, b)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return only_a, only_b


def mcnemar_exact_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the discordant pairs."""
    from statsmodels.stats.contingency_tables import mcnemar

    only_a, only_b = discordant_counts(a, b)
    if only_a + only_b == 0:
        return 1.0
    return float(mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue)


def paired_bootstrap_ci(
    a: Sequence[bool],
    b: Sequence[bool],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(b) - accuracy(a), resampling questions."""
    from scipy.stats import bootstrap

    _check_paired(a, b)
    if not a:
        raise ValueError("a paired bootstrap needs at least one paired question")
    differences = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if np.all(differences == differences[0]):
        # Every resample has the same mean; scipy would warn about a degenerate sample.
        return (float(differences[0]), float(differences[0]))
    result = bootstrap(
        (differences,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        batch=1000,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return (float(interval.low), float(interval.high))


@dataclass(frozen=True)
class Paired:
    """`b` against `a` on the same questions: the one paired comparison that `compare` and
    the report both show. Accuracies and differences are fractions."""

    n: int
    accuracy_a: float
    accuracy_b: float
    diff: float  # accuracy_b - accuracy_a
    ci95: tuple[float, float]  # paired bootstrap interval of `diff`
    only_a: int  # questions only `a` got right
    only_b: int
    p: float  # exact McNemar, before any multiple-comparison adjustment


def paired_comparison(a: Sequence[bool], b: Sequence[bool], n_resamples: int = 10_000,
                      seed: int = 0) -> Paired | None:
    """Accuracy difference, its bootstrap interval and McNemar p; None without questions."""
    if not a:
        _check_paired(a, b)
        return None
    only_a, only_b = discordant_counts(a, b)
    accuracy_a, accuracy_b = sum(a) / len(a), sum(b) / len(b)
    return Paired(len(a), accuracy_a, accuracy_b, accuracy_b - accuracy_a,
                  paired_bootstrap_ci(a, b, n_resamples, seed), only_a, only_b,
                  mcnemar_exact_p(a, b))


def holm_within(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values over the family of those present; None stays None."""
    present = [i for i, p in enumerate(p_values) if p is not None]
    adjusted = dict(zip(present, holm_adjust([p_values[i] for i in present]), strict=True))
    return [adjusted.get(i) for i in range(len(p_values))]


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    from statsmodels.stats.multitest import multipletests

    if len(p_values) == 0:
        return []
    return [float(p) for p in multipletests(list(p_values), method="holm")[1]]


def _check_paired(a: Sequence[bool], b: Sequence[bool]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} vs {len(b)})")
