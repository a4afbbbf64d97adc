"""The grader: tricky responses, both extractors, references, and never raising."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from primekd.core.errors import PrimekdError
from primekd.core.grading import (
    EXTRACTORS,
    extract_answer,
    grade,
    grade_row,
    is_correct,
    parse_number,
    reference_number,
)

# (response, number the default extractor must find)
DEFAULT_CASES = [
    # lm-eval strict-regex pitfalls
    ("So in total she has 18 apples. The answer is 18", 18),
    ("The total cost is $1,000.", 1000),
    ("She earns 1000.00", 1000),
    ("Adding them up gives **73**", 73),
    ("The answer is $1,000.", 1000),
    ("The answer is 18.00", 18),
    # precedence: boxed > #### > "the answer is" > "Answer:" > last number
    ("First 3 + 4 = 7, so \\boxed{7}. Then I checked 12 more.", 7),
    ("The answer is 5.\n#### 6", 6),
    ("Answer: 4\nThe answer is 9 because of 2 and 3.", 9),
    ("Answer: 12\nI used 3 boxes of 4 eggs.", 12),
    ("\\boxed{3}\n#### 8", 3),
    ("We compute 48/2 = 24 clips in May.\n#### 72", 72),
    # the last boxed wins, nested braces and LaTeX fractions inside
    ("\\boxed{1} is wrong, the right one is \\boxed{2}", 2),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("\\boxed{\\dfrac{1}{8}}", 0.125),
    ("\\boxed{18 \\text{ dollars}}", 18),
    ("\\boxed{\\$1{,}250}", 1250),
    ("\\boxed{x = 14}", 14),
    ("The answer is $\\boxed{42}$, not 7", 42),
    # thousands separators, currency, percent, units, trailing punctuation
    ("It costs $12,345,678 in total", 12345678),
    ("The population is 1 000 000 people", 1000000),
    ("He saved 2\u202f500 euros", 2500),
    ("The discount is 25%.", 25),
    ("She runs 42 km every week", 42),
    ("The final answer is 3.5 hours.", 3.5),
    ("it costs $.50", 0.5),
    ("The answer is: 18!", 18),
    ("Therefore, the answer is (18).", 18),
    # negatives, hyphens and ranges
    ("The temperature dropped to -5 degrees", -5),
    ("The answer is \u22127", -7),
    ("The balance is -$20", -20),
    ("She reads pages 10-15", 15),
    ("3 - 5 is how you get the difference of 8", 8),
    # fractions
    ("She ate 3/4 of the cake", 0.75),
    ("Half is 1/2", 0.5),
    ("The answer is 10/4", 2.5),
    # answer phrases
    ("The final answer is:\n\n**18**", 18),
    ("the correct answer is 21 apples", 21),
    ("THE ANSWER IS 64", 64),
    ("The answer is 3 + 4 = 7.", 7),
    ("The answer is 5 x 6 = 30 dollars", 30),
    ("**Answer:** 15 cookies", 15),
    ("Final Answer: 220", 220),
    ("The answer is 5.\nWait, let me recheck. The answer is 6.", 6),
    ("The answer is below.\nShe has 11 marbles.", 11),
    # last number
    ("Natalia sold 48 clips in April and 24 in May, 72 altogether", 72),
    ("12 + 30 = 42", 42),
    ("1,234 and 5", 5),
    ("Step 1: 2 + 2 = 4\nStep 2: 4 * 3 = 12", 12),
]

NO_ANSWER = ["", "I don't know.", "   \n\t", "The answer is unclear.", "\\boxed{}", "####"]


@pytest.mark.parametrize(("response", "expected"), DEFAULT_CASES)
def test_default_extractor(response: str, expected: float) -> None:
    assert extract_answer(response) == pytest.approx(expected)


def test_there_are_at_least_40_tricky_cases() -> None:
    assert len(DEFAULT_CASES) + len(NO_ANSWER) >= 40


@pytest.mark.parametrize("response", NO_ANSWER)
@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_no_answer_grades_incorrect(response: str, extractor: str) -> None:
    graded = grade(response, "#### 5", extractor)
    assert (graded.extracted, graded.correct, graded.no_answer) == (None, False, "no_number")
    assert graded.found_by is None and not graded.correct_flexible


PAPER_CASES = [
    # a first line whose numbers agree wins over everything but \boxed
    ("18\nThe answer is 20.", 18),
    ("The answer is 18. So 18 it is.\nOther numbers: 3, 4.", 18),
    ("\\boxed{9}\n18", 9),
    # a first line with disagreeing numbers falls through to "the answer is"
    ("Janet has 16 eggs and eats 3.\nThe answer is 13.\nCheck: 13 + 3 = 16", 13),
    ("I got 2 and 3.\nThe correct answer is 5.", 5),
    # no phrase: last number
    ("There are 2 cats and 3 dogs.\nSo 5 pets.", 5),
    # "####" and "Answer:" are not in the paper's precedence
    ("I had 2 and 3.\nAnswer: 5\nbecause of 4 and 1", 1),
]


@pytest.mark.parametrize(("response", "expected"), PAPER_CASES)
def test_paper_extractor(response: str, expected: float) -> None:
    assert extract_answer(response, "paper") == pytest.approx(expected)


def test_extractors_differ_on_first_line_rule() -> None:
    response = "Each box has 6 eggs.\nSo 4 boxes hold 24 eggs.\nThe answer is 24."
    assert extract_answer(response) == 24
    assert extract_answer(response, "paper") == 6


def test_unknown_extractor_is_a_clear_error() -> None:
    with pytest.raises(PrimekdError, match="default, paper, math-verify"):
        extract_answer("5", "fancy")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72),
        ("He pays 5 * 2 = 10\n#### 1,080", 1080),
        ("#### -3", -3),
        ("#### 0.5", 0.5),
        ("18", 18),
        (" 1,000 ", 1000),
        (42, 42),
        (2.5, 2.5),
        ("#### none", None),
        ("", None),
        (None, None),
        (True, None),
        (float("nan"), None),
    ],
)
def test_reference_number(answer: object, expected: float | None) -> None:
    assert reference_number(answer) == expected


def test_parse_number_reads_the_first_number() -> None:
    assert parse_number("$1,234.50 and 7") == 1234.5
    assert parse_number("nothing") is None
    assert parse_number("1/0") is None


@pytest.mark.parametrize(
    ("extracted", "gold", "expected"),
    [(18.0, 18.0, True), (18.000000001, 18.0, True), (18.01, 18.0, False), (None, 18.0, False),
     (18.0, None, False), (-3.0, 3.0, False), (0.75, 0.75, True), (1e12, 1e12 + 1e-4, True)],
)
def test_is_correct(extracted: float | None, gold: float | None, expected: bool) -> None:
    assert is_correct(extracted, gold) is expected


def test_grade_compares_with_reference() -> None:
    assert grade("The answer is 18.00", "blah\n#### 18")[:2] == (18.0, True)
    assert grade("The answer is 17", "18")[:2] == (17.0, False)


def test_grade_row_keeps_fields_and_accepts_reference_aliases() -> None:
    row = {"question": "q", "answer": "#### 4", "response": "2+2=4", "model": "m"}
    assert grade_row(row) == {**row, "gold": 4.0, "extracted": 4.0, "correct": True,
                              "found_by": "fallback", "no_answer": None, "truncated": None,
                              "correct_strict": False, "correct_flexible": True}
    assert grade_row({"reference": "#### 4", "response": "5"})["correct"] is False
    assert grade_row({"gold": 4, "response": None})["extracted"] is None


@pytest.mark.parametrize(
    ("row", "message"),
    [({"answer": "4"}, "response"), ({"response": "4"}, "answer"),
     ({"answer": "#### n/a", "response": "4"}, "no number")],
)
def test_grade_row_errors_say_what_is_missing(row: dict, message: str) -> None:
    with pytest.raises(PrimekdError, match=message):
        grade_row(row)


# --- properties -------------------------------------------------------------------------------

_TRICKY_TEXT = st.lists(
    st.sampled_from(list("0123456789 ,./-$%{}\\#*:\n\u2212\u202fxab=+()")
                    + ["\\boxed{", "\\frac{", "####", "The answer is ", "Answer:"]),
    max_size=60,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _TRICKY_TEXT),
       st.sampled_from([e for e in EXTRACTORS if e != "math-verify"]))
def test_never_raises_and_returns_a_finite_number_or_none(text: str, extractor: str) -> None:
    value = extract_answer(text, extractor)
    assert value is None or (isinstance(value, float) and math.isfinite(value))
    graded = grade(text, text, extractor)
    assert isinstance(graded.correct, bool)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=-10**9, max_value=10**9),
    st.sampled_from([
        "The answer is {n}.", "The answer is {c}", "#### {n}", "\\boxed{{{c}}}",
        "Answer: ${c}.", "So the total is **{n}**", "The final answer is {n}.00",
    ]),
    st.text(alphabet="abc .\n", max_size=30),
)
def test_an_integer_written_any_way_is_found(n: int, template: str, prefix: str) -> None:
    response = prefix + template.format(n=n, c=f"{n:,}")
    assert extract_answer(response) == n
    assert grade(response, f"#### {n}").correct
