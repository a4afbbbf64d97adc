"""Truncation-aware grading, strict/flexible side by side, the answer line, Math-Verify, and
the corner cases of issue 11 (each failed on the grader before it)."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from primekd.core.errors import PrimekdError
from primekd.core.grading import (
    MARKERS,
    answer_line_end,
    cross_check,
    extract,
    extract_answer,
    grade,
    grade_row,
    summarize_grades,
)

# --- corner cases: each read wrongly before ---------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("He ate 2 1/2 pizzas.", 2.5),  # was 0.5
        ("The answer is 3 1/4 cups", 3.25),
        ("-2 1/2 degrees", -2.5),
        ("She buys 3 100-gram bags.", 100),  # was 3100: `3 100` is not a thousands group
        ("\\boxed{10-3}", 7),  # was 3
        ("\\boxed{3 \\times 4}", 12),
        ("\\boxed{x = 2 + 3*4}", 14),
        ("\\boxed{(10 - 4) / 2}", 3),
        ("The answer is 7. Actually, it's 8.", 8),  # was 7
        ("The answer is 7. Actually it is 9 apples.", 9),
        ("It costs 1e3 dollars", 1000),  # was 3
        ("The distance is 2.5E2 meters", 250),
        ("The total is 12 345 dollars", 12345),
        ("Total: 1\u00a0000\u00a0000 people", 1_000_000),
        ("Q: how many?\nA: 14", 14),
    ],
)
def test_corner_cases(response: str, expected: float) -> None:
    assert extract_answer(response) == pytest.approx(expected)


def test_box_that_is_not_arithmetic_keeps_its_last_number() -> None:
    assert extract_answer("\\boxed{18 \\text{ dollars}}") == 18
    assert extract_answer("\\boxed{10/0}") is None  # no division by zero, no crash
    assert extract_answer("\\boxed{-5}") == -5


def test_words_and_ids_with_e_are_not_exponents() -> None:
    assert extract_answer("He bought 10 eggs") == 10
    assert extract_answer("Room 3e is 4") == 4


# --- how the answer was found -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "found_by"),
    [
        ("so \\boxed{4}", "boxed"),
        ("2+2\n#### 4", "hashes"),
        ("The answer is 4.", "answer_is"),
        ("My final answer is 4", "answer_is"),
        ("**Answer:** 4", "answer_colon"),
        ("Q: x\nA: 4", "last_line_a"),
        ("2 + 2 = 4", "fallback"),
        ("no number", None),
    ],
)
def test_found_by_names_the_marker_or_fallback(response: str, found_by: str | None) -> None:
    assert extract(response).found_by == found_by
    assert found_by is None or found_by == "fallback" or found_by in MARKERS


def test_paper_first_line_is_a_fallback_not_a_marker() -> None:
    assert extract("4 apples\nmore text", "paper").found_by == "fallback"


# --- the grading rules -------------------------------------------------------------------------

TRUNCATED_RAMBLE = "the cost of the trip is 100%.\n\nNow, we need"  # from issue 11


def test_truncated_answer_without_marker_is_not_correct() -> None:
    graded = grade(TRUNCATED_RAMBLE, "#### 100", finish_reason="length")
    assert graded.correct is False and graded.no_answer == "truncated"
    assert graded.truncated is True and graded.correct_flexible is True
    assert graded.correct_strict is False


def test_lenient_keeps_the_old_last_number_rule() -> None:
    graded = grade(TRUNCATED_RAMBLE, "#### 100", finish_reason="length", lenient=True)
    assert graded.correct is True and graded.no_answer == "truncated"


def test_truncated_answer_with_marker_counts() -> None:
    graded = grade("The answer is 100. Now let me also", "#### 100", finish_reason="length")
    assert graded.correct and graded.correct_strict and graded.no_answer is None


def test_complete_answer_with_fallback_number_counts_but_not_strictly() -> None:
    graded = grade("So she pays 100 dollars.", "#### 100", finish_reason="stop")
    assert graded.correct and graded.correct_flexible and not graded.correct_strict
    assert graded.truncated is False


def test_unknown_finish_reason_is_treated_as_complete() -> None:
    graded = grade("So she pays 100 dollars.", "#### 100")
    assert graded.correct and graded.truncated is None


def test_grade_row_reads_finish_reason_or_truncated_flag() -> None:
    row = {"answer": "#### 100", "response": TRUNCATED_RAMBLE}
    assert grade_row({**row, "finish_reason": "length"})["correct"] is False
    assert grade_row({**row, "truncated": True})["correct"] is False
    assert grade_row({**row, "truncated": False})["correct"] is True
    assert grade_row(row)["truncated"] is None


def test_summary_counts_strict_flexible_truncated_and_no_number() -> None:
    rows = [grade_row(r) for r in [
        {"answer": "1", "response": "The answer is 1.", "finish_reason": "stop"},
        {"answer": "2", "response": "so 2", "finish_reason": "stop"},
        {"answer": "3", "response": "we get 3 and", "finish_reason": "length"},
        {"answer": "4", "response": "no idea", "finish_reason": "stop"},
    ]]
    s = summarize_grades(rows)
    assert (s["n"], s["correct"], s["correct_strict"], s["correct_flexible"]) == (4, 2, 1, 3)
    assert (s["truncated"], s["truncated_no_marker"], s["no_number"]) == (1, 1, 1)
    assert s["no_answer"] == 2 and s["truncation_known"] is True
    unknown = summarize_grades([grade_row({"answer": "1", "response": "1"})])
    assert unknown["truncation_known"] is False and unknown["truncation_unknown_rows"] == 1


# --- where the answer line ends ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("Step 1.\nThe answer is 18.\nNow let us", "Step 1.\nThe answer is 18."),
        ("#### 72\n\nQuestion: next", "#### 72"),
        ("So \\boxed{7} it is.\nMore", "So \\boxed{7} it is."),
        ("The final answer is:\n\n**18**\nExtra", "The final answer is:\n\n**18**"),
        ("The answer is 7. Actually, it's 8.\nMore", "The answer is 7. Actually, it's 8."),
    ],
)
def test_answer_line_end_keeps_the_whole_answer_line(text: str, cut: str) -> None:
    end = answer_line_end(text)
    assert end is not None and text[:end] == cut


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 18.",  # the line may still go on
        "Step 1: 2 + 2 = 4\nStep 2: 4 * 3 = 12\n",  # no marker
        "Answer: Let us think step by step.\nFirst, she has 5 apples.\n",  # no number near it
        "\\boxed{18",  # unclosed box
        "",
    ],
)
def test_answer_line_end_waits_for_a_complete_marked_line(text: str) -> None:
    assert answer_line_end(text) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_answer_line_end_never_raises(text: str) -> None:
    end = answer_line_end(text)
    assert end is None or text[end] == "\n"


# --- Math-Verify -------------------------------------------------------------------------------


def test_math_verify_reads_latex_and_plain_answers() -> None:
    assert extract_answer("The answer is $\\frac{1}{2}$", "math-verify") == 0.5
    assert extract_answer("so \\boxed{18}", "math-verify") == 18
    assert extract_answer("no number here", "math-verify") is None
    graded = grade("so \\boxed{18}", "Janet sells 9 * 2 = 18\n#### 18", "math-verify")
    assert graded.correct and graded.found_by == "boxed"


def test_math_verify_runs_outside_the_main_thread() -> None:
    values: list[float | None] = []
    thread = threading.Thread(
        target=lambda: values.append(extract_answer("\\boxed{42}", "math-verify")))
    thread.start()
    thread.join()
    assert values == [42]


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=120), st.lists(st.sampled_from(
    ["\\boxed{", "\\frac{", "}", "{", "$", "1", "2", "=", "/", "^", "\\sqrt", "x", " ",
     "The answer is ", "\n", "\\infty", "i", "e", "\\pi", ","]), max_size=40).map("".join)))
def test_math_verify_never_raises(text: str) -> None:
    value = extract_answer(text, "math-verify")
    assert value is None or (isinstance(value, float) and math.isfinite(value))


def test_math_verify_input_is_bounded() -> None:
    assert extract_answer("1 + " * 20_000 + "\\boxed{5}", "math-verify") == 5


# --- cross-check -------------------------------------------------------------------------------


def test_cross_check_lists_disagreements_of_each_kind() -> None:
    rows = [
        {"id": "a", "answer": "#### 6", "response": "Each box has 6 eggs.\nSo 24 eggs."},
        {"id": "b", "answer": "#### 24", "response": "Each box has 6 eggs.\nSo 24 eggs."},
        {"id": "c", "answer": "#### 5", "response": "The answer is 5."},
    ]
    result = cross_check(rows, ["default", "paper"])
    (pair,) = result["pairs"]
    assert (pair["a"], pair["b"], pair["disagree"]) == ("default", "paper", 2)
    assert [e["id"] for e in pair["examples"]["only_a_correct"]] == ["b"]
    assert [e["id"] for e in pair["examples"]["only_b_correct"]] == ["a"]
    assert pair["examples"]["only_b_correct"][0]["paper"] == 6
    assert result["accuracy"] == {"default": pytest.approx(2 / 3), "paper": pytest.approx(2 / 3)}


def test_cross_check_unknown_extractor_is_an_error() -> None:
    with pytest.raises(PrimekdError, match="choose one of"):
        cross_check([], ["default", "regex"])


# --- eval applies the rule when it regrades ----------------------------------------------------


def test_eval_regrade_marks_a_truncated_ramble_wrong(tmp_path) -> None:
    """What `eval` (and so `tune`'s val_accuracy) counts: issue 11's 3/20 came from rows
    like these."""
    import json

    from primekd.evaluate.evaluator import accuracy_summary, finalize_results

    rows = [
        {"id": "test-00000", "reference": "#### 18", "response": "She sells 18 eggs and then",
         "finish_reason": "length", "n_tokens": 160},
        {"id": "test-00001", "reference": "#### 3", "response": "So 3 bolts.\nThe answer is 3.",
         "finish_reason": "stop", "n_tokens": 20},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    graded = finalize_results(path, "test", "default")
    assert [r["correct"] for r in graded] == [False, True]
    assert [r["no_answer"] for r in graded] == ["truncated", None]
    summary = accuracy_summary(graded)
    assert (summary["correct"], summary["correct_flexible"], summary["truncated"]) == (1, 2, 1)
    lenient = finalize_results(path, "test", "default", lenient=True)
    assert [r["correct"] for r in lenient] == [True, True]


def test_answer_line_end_scans_a_bounded_window_after_each_marker() -> None:
    """10,000 markers without numbers: an unbounded search after each would read ~10^9
    characters (minutes); the bounded one reads ~10^6."""
    text = "The answer is unclear. " * 5000 + "#### " * 5000 + "\n"
    assert answer_line_end(text) is None
    assert answer_line_end("The answer is " + "x" * 200 + " 5.\n") is None  # too far away
