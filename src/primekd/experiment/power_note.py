"""The report's sentence on the power of its primary comparison (`core.power`).

The primary comparison is the primed student against the unprimed one: `kd-ground_truth`
against `kd-none` where both ran, else the first other `kd-*` student. Its power is computed
at the discordance measured on the run's own answers, for a difference of `report.power_diff`
points, at alpha / m with m the comparisons in `kd-none`'s Holm family (every other model).
"""

from __future__ import annotations

from collections.abc import Sequence

from primekd.core import power, stats

REFERENCE = "kd-none"


def primary(names: Sequence[str]) -> str | None:
    """The student compared with `kd-none` first, or None without one."""
    if REFERENCE not in names:
        return None
    if "kd-ground_truth" in names:
        return "kd-ground_truth"
    return next((n for n in names if n.startswith("kd-") and n != REFERENCE), None)


def sentence(name: str, reference: Sequence[bool], other: Sequence[bool], diff_points: float,
             comparisons: int, alpha: float = 0.05) -> str:
    """'**Power.** The primary comparison ...': the power at n and the n for 80%."""
    if not reference:
        return ""
    only_a, only_b = stats.discordant_counts(reference, other)
    plan = power.plan((only_a + only_b) / len(reference), diff_points / 100, len(reference),
                      alpha, 0.8, comparisons)
    return (f"**Power.** The primary comparison, `{name}` against `{REFERENCE}`: "
            f"{power.describe(plan)}; the discordance is measured on these answers "
            f"({only_a + only_b} questions only one of the two got right).")
