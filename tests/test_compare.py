"""Comparing results files: pairing, statistics, unmatched questions, errors, rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from scipy.stats import binomtest

from primekd.analyze.compare import compare_files, load_results, render_comparison
from primekd.core.errors import PrimekdError
from primekd.core.stats import holm_adjust, wilson_interval


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def results(flags: list[bool], ids: list[int] | None = None) -> list[dict]:
    """Rows shaped like DESIGN.md's results.jsonl."""
    ids = ids if ids is not None else list(range(len(flags)))
    return [
        {"id": f"test-{i}", "question": f"Question {i}?", "reference": "#### 1", "gold": 1.0,
         "response": "...", "extracted": 1.0 if ok else None, "correct": ok, "n_tokens": 9}
        for i, ok in zip(ids, flags, strict=True)
    ]


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    base = [True] * 10 + [False] * 30
    # kd: 2 questions lost, 12 gained relative to base; sft: 1 lost, 3 gained.
    kd = [False] * 2 + [True] * 8 + [True] * 12 + [False] * 18
    sft = [False] + [True] * 9 + [True] * 3 + [False] * 27
    return [
        write(tmp_path / "eval" / "base" / "results.jsonl", results(base)),
        write(tmp_path / "eval" / "kd" / "results.jsonl", results(kd)),
        write(tmp_path / "eval" / "sft" / "results.jsonl", results(sft)),
    ]


def test_summaries_and_pairwise_statistics(three_runs: list[Path]) -> None:
    comparison = compare_files(three_runs, bootstrap=500, seed=1)
    assert comparison.reference == "base/results.jsonl"
    assert [f.label for f in comparison.files] == [
        "base/results.jsonl", "kd/results.jsonl", "sft/results.jsonl"]
    base, kd, _ = comparison.files
    assert (base.n, base.correct, base.accuracy) == (40, 10, 0.25)
    assert kd.ci95 == pytest.approx(wilson_interval(20, 40))
    assert base.no_answer == 30

    kd_pair, sft_pair = comparison.pairs
    assert kd_pair.matched_by == "id"
    assert kd_pair.n_paired == 40
    assert kd_pair.diff_points == pytest.approx(25.0)
    assert (kd_pair.only_reference_correct, kd_pair.only_file_correct) == (2, 12)
    assert kd_pair.p_mcnemar == pytest.approx(binomtest(2, 14).pvalue)
    assert sft_pair.p_mcnemar == pytest.approx(binomtest(1, 4).pvalue)
    assert [kd_pair.p_holm, sft_pair.p_holm] == pytest.approx(
        holm_adjust([kd_pair.p_mcnemar, sft_pair.p_mcnemar]))
    low, high = kd_pair.ci95_points
    assert low < 25.0 < high
    assert kd_pair.only_in_reference == [] and kd_pair.only_in_file == []


def test_seed_makes_the_bootstrap_reproducible(three_runs: list[Path]) -> None:
    first = compare_files(three_runs[:2], bootstrap=300, seed=5).pairs[0].ci95_points
    assert compare_files(three_runs[:2], bootstrap=300, seed=5).pairs[0].ci95_points == first


def test_reference_option(three_runs: list[Path], tmp_path: Path) -> None:
    comparison = compare_files(three_runs, reference=three_runs[1], bootstrap=200)
    assert comparison.reference == "kd/results.jsonl"
    assert [p.label for p in comparison.pairs] == ["base/results.jsonl", "sft/results.jsonl"]
    assert comparison.pairs[0].diff_points == pytest.approx(-25.0)
    # A reference that is not among the files is added to them.
    extra = compare_files(three_runs[1:], reference=three_runs[0], bootstrap=200)
    assert extra.reference == "base/results.jsonl"
    assert len(extra.files) == 3 and len(extra.pairs) == 2


def test_unmatched_questions_are_reported(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", results([True, False, True, False], ids=[0, 1, 2, 3]))
    b = write(tmp_path / "b.jsonl", results([True, True, True], ids=[1, 2, 9]))
    pair = compare_files([a, b], bootstrap=200).pairs[0]
    assert pair.n_paired == 2
    assert pair.only_in_reference == ["test-0", "test-3"]
    assert pair.only_in_file == ["test-9"]
    assert pair.diff_points == pytest.approx(50.0)  # paired: a 1/2, b 2/2
    out = Console(record=True, width=200)
    out.print(render_comparison(compare_files([a, b], bootstrap=200)))
    text = out.export_text()
    assert "2 question(s) only in a.jsonl" in text and "1 question(s) only in b.jsonl" in text


def test_no_overlap_gives_no_test(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", results([True], ids=[0]))
    b = write(tmp_path / "b.jsonl", results([True], ids=[1]))
    pair = compare_files([a, b], bootstrap=200).pairs[0]
    assert (pair.n_paired, pair.p_mcnemar, pair.p_holm, pair.ci95_points) == (0, None, None, None)


def test_foreign_files_are_graded_and_paired_by_question(tmp_path: Path) -> None:
    ours = write(tmp_path / "ours.jsonl", results([True, False, False]))
    # Another tool's output: no ids, no `correct`, extra whitespace in the question text.
    theirs = write(tmp_path / "theirs.jsonl", [
        {"question": "Question  0?", "answer": "#### 1", "response": "The answer is 1."},
        {"question": "Question 1?", "answer": "1", "response": "\\boxed{1}"},
        {"question": "Question 2?\n", "answer": "#### 1", "response": "I think 2"},
    ])
    loaded = load_results(theirs)
    assert loaded.graded_here == 3 and [r.correct for r in loaded.rows] == [True, True, False]
    comparison = compare_files([ours, theirs], bootstrap=200)
    pair = comparison.pairs[0]
    assert (pair.matched_by, pair.n_paired) == ("question", 3)
    assert pair.diff_points == pytest.approx(100 / 3)
    assert comparison.files[1].graded_here == 3
    assert json.loads(json.dumps(comparison.to_dict()))["pairs"][0]["n_paired"] == 3


def test_paper_extractor_applies_to_foreign_rows(tmp_path: Path) -> None:
    rows = [{"id": "x", "answer": "6", "response": "Each box has 6 eggs.\nThe answer is 24."}]
    path = write(tmp_path / "f.jsonl", rows)
    assert load_results(path).rows[0].correct is False
    assert load_results(path, "paper").rows[0].correct is True


@pytest.mark.parametrize(
    ("rows_a", "rows_b", "message"),
    [
        (results([True, True], ids=[0, 0]), results([True]), "appears twice"),
        (results([True]), [{"id": "test-0", "question": "Other?", "correct": True}],
         "different questions"),
        (results([True]), [{"correct": True}], "give every row an `id` or a `question`"),
        (results([True]), [{"id": "test-0", "response": "5"}], "f.jsonl:1: no boolean"),
    ],
)
def test_bad_inputs_are_clear_errors(
    tmp_path: Path, rows_a: list[dict], rows_b: list[dict], message: str
) -> None:
    a, b = write(tmp_path / "a.jsonl", rows_a), write(tmp_path / "f.jsonl", rows_b)
    with pytest.raises(PrimekdError, match=message):
        compare_files([a, b], bootstrap=200)


def test_file_level_errors(tmp_path: Path) -> None:
    good = write(tmp_path / "a.jsonl", results([True]))
    with pytest.raises(PrimekdError, match="does not exist"):
        compare_files([good, tmp_path / "missing.jsonl"])
    with pytest.raises(PrimekdError, match="no rows"):
        compare_files([write(tmp_path / "empty.jsonl", [])])
    with pytest.raises(PrimekdError, match="directory"):
        compare_files([tmp_path])
    with pytest.raises(PrimekdError, match="at least 100"):
        compare_files([good], bootstrap=10)
    with pytest.raises(PrimekdError, match="match mode"):
        compare_files([good], match="fuzzy")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "correct": true}\n{"id": 2, "corr', encoding="utf-8")
    with pytest.raises(PrimekdError, match="broken.jsonl:2 is not valid JSON"):
        compare_files([good, broken])


def test_single_file_has_no_pairs(tmp_path: Path) -> None:
    comparison = compare_files([write(tmp_path / "a.jsonl", results([True, False]))])
    assert comparison.pairs == [] and comparison.files[0].accuracy == 0.5
    out = Console(record=True, width=120)
    out.print(render_comparison(comparison))
    assert "50.0%" in out.export_text()


def test_power_at_the_measured_discordance(three_runs: list[Path]) -> None:
    from primekd.core import power

    comparison = compare_files(three_runs, bootstrap=200, power_diff=8)
    kd_pair, sft_pair = comparison.pairs
    # kd against base: 2 + 12 of 40 questions discordant; Holm's first step over 2 pairs
    plan = kd_pair.power
    assert plan.discordance == pytest.approx(14 / 40) and plan.comparisons == 2
    assert plan.power_at_n == pytest.approx(power.mcnemar_power(40, 0.35, 0.08, 0.05, 2))
    assert plan.n_needed == power.mcnemar_n(0.35, 0.08, 0.05, 0.8, 2)
    assert sft_pair.power.n_needed < plan.n_needed  # 4 of 40 discordant: fewer needed
    assert compare_files(three_runs, bootstrap=200).pairs[0].power is None
    out = Console(record=True, width=140)
    out.print(render_comparison(comparison))
    text = out.export_text()
    assert "power to detect 8 points" in text and "14 (35.0%)" in text
    assert f"{plan.n_needed:,}" in text


def test_power_options_are_checked(three_runs: list[Path]) -> None:
    with pytest.raises(PrimekdError, match="--power-diff must be between"):
        compare_files(three_runs, bootstrap=200, power_diff=0)
    with pytest.raises(PrimekdError, match="--power must be between"):
        compare_files(three_runs, bootstrap=200, power_diff=8, target_power=1.2)


def test_compare_cli_power_diff(three_runs: list[Path]) -> None:
    from typer.testing import CliRunner

    import primekd.cli  # noqa: F401  registers every command on the app
    from primekd.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["compare", *map(str, three_runs), "--bootstrap", "200",
                                 "--power-diff", "8", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["pairs"][0]["power"]
    assert plan["discordance"] == pytest.approx(0.35) and plan["n"] == 40
    assert plan["target_power"] == 0.8 and plan["n_needed"] > 40
    bad = runner.invoke(app, ["compare", *map(str, three_runs), "--power-diff", "120"])
    assert isinstance(bad.exception, PrimekdError)  # main() prints it in one line, exit 2
    assert "--power-diff must be between" in str(bad.exception)
