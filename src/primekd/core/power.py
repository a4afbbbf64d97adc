"""Power of the paired comparison primekd reports (exact McNemar), and the questions it needs.

Two models answer the same n questions. Per question the pair is concordant (both right or
both wrong) or discordant: only `a` right (probability p10) or only `b` right (p01). The
*discordance* is psi = p10 + p01, the difference in accuracy delta = p01 - p10. McNemar's
test sees only the discordant questions, so power depends on psi and delta, not on the
accuracies.

`mcnemar_power` is exact for the test `compare` and the report run (statsmodels' exact
McNemar: a two-sided binomial test on the discordant pairs): the number of discordant
questions is Binomial(n, psi), and given d of them the count only `b` got right is
Binomial(d, p01 / psi). `mcnemar_n` is the smallest n whose exact power reaches the target,
searched upward from Connor's (1987) normal approximation
n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2.

Multiple comparisons: the report adjusts with Holm's procedure over m comparisons; the
smallest p-value is tested at alpha / m, which is what `comparisons=m` plans for (the
conservative first step of Holm, so the planned power is a lower bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from primekd.core.errors import PrimekdError

MAX_N = 200_000


@dataclass(frozen=True)
class PowerPlan:
    """What a paired comparison can detect: all shares are fractions."""

    discordance: float  # psi: share of questions where exactly one model is right
    diff: float  # the difference to detect, accuracy(b) - accuracy(a), as a fraction
    alpha: float  # family-wise level
    comparisons: int  # m: the test is run at alpha / m (Holm's first step)
    n: int | None  # questions evaluated (None: none yet)
    power_at_n: float | None  # exact power at n
    target_power: float
    n_needed: int | None  # smallest n with exact power >= target_power; None: unreachable


def check_inputs(discordance: float, diff: float, alpha: float = 0.05,
                 comparisons: int = 1) -> None:
    if not 0 < alpha < 1:
        raise PrimekdError(f"alpha must be between 0 and 1, not {alpha}")
    if comparisons < 1:
        raise PrimekdError(f"the number of comparisons must be at least 1, not {comparisons}")
    if not 0 < abs(diff) < 1:
        raise PrimekdError(f"the difference to detect must be between 0 and 100 points, "
                           f"not {100 * diff:g}")
    if not 0 <= discordance <= 1:
        raise PrimekdError(f"discordance must be between 0 and 1, not {discordance}")


def mcnemar_power(n: int, discordance: float, diff: float, alpha: float = 0.05,
                  comparisons: int = 1) -> float:
    """Exact power of the two-sided exact McNemar test at level alpha / comparisons, on n
    paired questions, when the models disagree on a share `discordance` of them and differ
    in accuracy by `diff` (fractions). 0 where `diff` cannot occur (|diff| > discordance)."""
    from scipy.stats import binom

    check_inputs(discordance, diff, alpha, comparisons)
    if n <= 0 or abs(diff) > discordance:
        return 0.0
    level = alpha / comparisons
    d = np.arange(n + 1)
    # the rejection bound: the largest k with P(min(b, c) <= k | d, 1/2) = 2 cdf(k) <= level
    k = binom.ppf(level / 2, d, 0.5)  # smallest k with cdf(k) >= level / 2
    critical = np.where(binom.cdf(k, d, 0.5) <= level / 2 * (1 + 1e-12), k, k - 1)
    q = (discordance + diff) / 2 / discordance  # P(only b right | discordant)
    reject_low = binom.cdf(critical, d, q)
    reject_high = binom.sf(d - critical - 1, d, q)
    power_given_d = np.where(critical >= 0, reject_low + reject_high, 0.0)
    return float(np.sum(binom.pmf(d, n, discordance) * power_given_d))


def connor_n(discordance: float, diff: float, alpha: float = 0.05, power: float = 0.8,
             comparisons: int = 1) -> int:
    """Connor's (1987) normal-approximation sample size for McNemar's test."""
    check_inputs(discordance, diff, alpha, comparisons)
    if abs(diff) > discordance:
        raise PrimekdError(f"a difference of {100 * abs(diff):g} points needs at least that "
                           f"much discordance, not {100 * discordance:g}%")
    z_alpha = NormalDist().inv_cdf(1 - alpha / comparisons / 2)
    z_power = NormalDist().inv_cdf(power)
    root = z_alpha * math.sqrt(discordance) + z_power * math.sqrt(discordance - diff**2)
    return math.ceil(root**2 / diff**2)


def mcnemar_n(discordance: float, diff: float, alpha: float = 0.05, power: float = 0.8,
              comparisons: int = 1) -> int | None:
    """Smallest n whose exact power reaches `power` (None: not below MAX_N). The exact
    test's power saws up and down with n; this is the first n that reaches it."""
    if not 0 < power < 1:
        raise PrimekdError(f"power must be between 0 and 1, not {power}")
    if abs(diff) > discordance:
        return None
    n = max(1, int(connor_n(discordance, diff, alpha, power, comparisons) * 0.9))
    step = max(1, n // 50)
    while n <= MAX_N and mcnemar_power(n, discordance, diff, alpha, comparisons) < power:
        n += step
    if n > MAX_N:
        return None
    while n > 1 and mcnemar_power(n - 1, discordance, diff, alpha, comparisons) >= power:
        n -= 1  # back to the first n within the last step
    return n


def plan(discordance: float, diff: float, n: int | None = None, alpha: float = 0.05,
         power: float = 0.8, comparisons: int = 1) -> PowerPlan:
    """The power at n (where given) and the n needed for `power`, for one comparison."""
    return PowerPlan(discordance, diff, alpha, comparisons, n,
                     None if n is None else mcnemar_power(n, discordance, diff, alpha,
                                                          comparisons),
                     power, mcnemar_n(discordance, diff, alpha, power, comparisons)
                     if discordance > 0 else None)


def describe(p: PowerPlan) -> str:
    """One sentence: the power at n and the n needed, with the assumptions that give them."""
    level = (f"alpha {p.alpha:g}" if p.comparisons == 1 else
             f"alpha {p.alpha:g}/{p.comparisons} (Holm's first step over {p.comparisons} "
             "comparisons)")
    needed = ("no number of questions reaches it at this discordance"
              if p.n_needed is None else f"{p.target_power:.0%} power needs {p.n_needed:,} "
              "questions")
    at_n = "" if p.power_at_n is None else \
        f"power {p.power_at_n:.0%} on these {p.n:,} questions; "
    return (f"{at_n}{needed} (exact McNemar, {level}, to detect {100 * abs(p.diff):g} "
            f"points with {100 * p.discordance:.1f}% of questions discordant)")
