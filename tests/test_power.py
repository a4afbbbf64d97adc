"""McNemar power and sample size against a simulation of the test primekd runs, a
brute-force enumeration, and Connor's (1987) formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, multinomial
from statsmodels.stats.contingency_tables import mcnemar

from primekd.core import power
from primekd.core.errors import PrimekdError


def _brute_power(n: int, psi: float, diff: float, level: float) -> float:
    """Sum over every (only a, only b) table of n questions, with statsmodels' exact test."""
    p10, p01 = (psi - diff) / 2, (psi + diff) / 2
    total = 0.0
    for b in range(n + 1):
        for c in range(n + 1 - b):
            if b + c and mcnemar([[0, b], [c, 0]], exact=True).pvalue <= level:
                total += multinomial.pmf([b, c, n - b - c], n, [p10, p01, 1 - psi])
    return total


@pytest.mark.parametrize(("n", "psi", "diff", "m"), [(30, 0.4, 0.2, 1), (40, 0.3, 0.15, 3),
                                                     (25, 0.5, -0.3, 2)])
def test_power_equals_brute_force_enumeration(n: int, psi: float, diff: float, m: int) -> None:
    assert power.mcnemar_power(n, psi, diff, comparisons=m) == pytest.approx(
        _brute_power(n, psi, diff, 0.05 / m), abs=1e-9)


def test_power_matches_a_simulation_of_the_exact_test() -> None:
    rng = np.random.default_rng(0)
    n, psi, diff, sims = 200, 0.25, 0.08, 2000
    counts = rng.multinomial(n, [(psi - diff) / 2, (psi + diff) / 2, 1 - psi], size=sims)
    rejected = [mcnemar([[0, b], [c, 0]], exact=True).pvalue <= 0.05 / 3
                for b, c, _ in counts]
    expected = power.mcnemar_power(n, psi, diff, comparisons=3)
    assert 0.1 < expected < 0.9  # a value where a wrong formula would show
    assert np.mean(rejected) == pytest.approx(expected, abs=3.5 * math.sqrt(0.25 / sims))


def test_connor_formula_known_value() -> None:
    # psi 0.25, delta 0.08, alpha 0.05, power 0.8: (1.95996*0.5 + 0.84162*sqrt(0.2436))^2
    # / 0.0064 = 304.2 -> 305
    assert power.connor_n(0.25, 0.08) == 305
    assert power.connor_n(0.25, 0.08, comparisons=3) > 305


def test_sample_size_is_the_first_n_reaching_the_power() -> None:
    n = power.mcnemar_n(0.25, 0.08, power=0.8, comparisons=3)
    assert n is not None
    assert power.mcnemar_power(n, 0.25, 0.08, comparisons=3) >= 0.8
    assert power.mcnemar_power(n - 1, 0.25, 0.08, comparisons=3) < 0.8
    # the exact test needs a few more questions than the normal approximation
    assert 0.95 * power.connor_n(0.25, 0.08, comparisons=3) <= n <= \
        1.15 * power.connor_n(0.25, 0.08, comparisons=3)


def test_more_discordance_needs_more_questions_and_bigger_effects_fewer() -> None:
    assert power.mcnemar_n(0.15, 0.08) < power.mcnemar_n(0.3, 0.08)
    assert power.mcnemar_n(0.3, 0.12) < power.mcnemar_n(0.3, 0.08)


def test_impossible_difference_has_no_power() -> None:
    assert power.mcnemar_power(500, 0.05, 0.08) == 0.0
    assert power.mcnemar_n(0.05, 0.08) is None
    plan = power.plan(0.05, 0.08, n=500)
    assert plan.n_needed is None and "no number of questions" in power.describe(plan)


def test_describe_states_the_assumptions() -> None:
    text = power.describe(power.plan(0.25, 0.08, n=400, comparisons=3))
    assert "0.05/3" in text and "8 points" in text and "25.0%" in text
    assert "on these 400 questions" in text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"discordance": 0.2, "diff": 0.0}, "difference"),
    ({"discordance": 1.5, "diff": 0.1}, "discordance"),
    ({"discordance": 0.2, "diff": 0.1, "alpha": 0.0}, "alpha"),
    ({"discordance": 0.2, "diff": 0.1, "comparisons": 0}, "comparisons"),
])
def test_bad_inputs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(PrimekdError, match=message):
        power.mcnemar_power(100, **kwargs)


def test_zero_questions_have_zero_power() -> None:
    assert power.mcnemar_power(0, 0.3, 0.1) == 0.0
    assert binom.pmf(0, 0, 0.3) == 1.0  # scipy's edge case the vectorised sum relies on


def _results(path, flags: list[bool]) -> None:
    import json

    path.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": "q", "reference": "#### 1", "gold": 1,
             "response": "The answer is 1", "extracted": 1, "correct": ok, "n_tokens": 5,
             "finish_reason": "stop"} for i, ok in enumerate(flags)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"n": len(rows)}))


def test_report_states_the_primary_comparisons_power(tmp_path) -> None:
    from primekd.experiment import report

    n = 100
    _results(tmp_path / "eval" / "base", [i < 20 for i in range(n)])
    _results(tmp_path / "eval" / "kd-none", [i < 25 for i in range(n)])
    # 10 questions only kd-none got right, 15 only kd-ground_truth: 25% discordant
    _results(tmp_path / "eval" / "kd-ground_truth", [10 <= i < 40 for i in range(n)])
    report.write_report(tmp_path)
    first = (tmp_path / "report.md").read_text().split("\n## ", 1)[0]
    expected = power.plan(0.25, 0.08, n, comparisons=2)
    assert "**Power.** The primary comparison, `kd-ground_truth` against `kd-none`" in first
    assert f"power {expected.power_at_n:.0%} on these 100 questions" in first
    assert f"needs {expected.n_needed:,} questions" in first and "0.05/2" in first
    assert "25 questions only one of the two got right" in first
    report.write_report(tmp_path, power_diff=12)  # the run stage passes report.power_diff
    assert "to detect 12 points" in (tmp_path / "report.md").read_text()
