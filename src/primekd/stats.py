"""Statistics for accuracy: intervals and paired comparisons (placeholder API)."""

from __future__ import annotations


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return (0.0, 1.0)
    lo, hi = proportion_confint(correct, n, alpha=1 - confidence, method="wilson")
    return (float(lo), float(hi))
