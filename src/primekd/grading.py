"""Extract final numeric answers from model responses and grade them against references.

Two extractors, each a list of rules tried in order; the first rule that finds a number wins:

- `default`: the last `\\boxed{...}`; the number after the last `####`; the number after the
  last "the (final|correct) answer is"; the number after the last "Answer:"; the last number.
- `paper`: the precedence of Goyal et al. (2024): `\\boxed{...}`; a number on the first line
  when all the numbers there agree; "the (final|correct) answer is"; the last number.

Numbers may carry `$`, `%`, units, thousands separators (`1,000`, `1 000`), a trailing
period, markdown bold, a minus sign, or be a simple fraction (`3/4`, `\\frac{3}{4}`).
Nothing here raises on any input string: a response without a number grades as incorrect.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from primekd.errors import PrimekdError

EXTRACTORS = ("default", "paper")

# A minus sign counts only where it cannot be a hyphen or a subtraction (`10-15`, `x-5`).
_SIGN = r"(?:(?<![\w)\]}])[-\u2212])?"
_SPACE_GROUP = r"[ \u00a0\u2009\u202f]"
_INTEGER = (
    r"(?:\d{1,3}(?:,\d{3})+(?![\d,]\d)"  # 1,000,000
    rf"|\d{{1,3}}(?:{_SPACE_GROUP}\d{{3}})+(?![\d])"  # 1 000 000
    r"|\d+)"
)
_NUMBER_SOURCE = (
    rf"(?P<sign>{_SIGN})(?:\$\s?)?"
    rf"(?P<int>{_INTEGER}(?:\.\d+)?|(?<![\w.])\.\d+)"
    r"(?:/(?P<den>\d+(?:\.\d+)?)(?![\d/]))?"
)
_NUMBER = re.compile(_NUMBER_SOURCE)
# `NUM op NUM ... = RESULT` right after an answer phrase: the result is the answer.
_EQUATION_TAIL = re.compile(
    r"(?:\s*[-+*/\u00d7\u00f7x\u00b7]\s*\$?\d[\d,]*(?:\.\d+)?\)?)+\s*=\s*"
)

_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DIGIT = re.compile(r"\d")
_BRACE = re.compile(r"[{}]")
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+|correct\s+)?answer\s+is\b\s*:?", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"answer\**\s*:", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The first number in `text` as a float, or None when there is none."""
    match = _NUMBER.search(_normalize(text))
    return _value(match) if match else None


def reference_number(answer: object) -> float | None:
    """The gold number of a reference: the part after the last `####`, or a bare number."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int | float):
        return float(answer) if math.isfinite(answer) else None
    return parse_number(str(answer).rsplit("####", 1)[-1])


class Grade(NamedTuple):
    extracted: float | None
    correct: bool


def extract_answer(response: str, extractor: str = "default") -> float | None:
    """The final numeric answer in a response, or None when it has none."""
    check_extractor(extractor)
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    text = _normalize(response)
    for rule in _RULES[extractor]:
        value = rule(text)
        if value is not None:
            return value
    return None


def check_extractor(extractor: str) -> None:
    if extractor not in EXTRACTORS:
        raise PrimekdError(
            f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}"
        )


def is_correct(extracted: float | None, gold: float | None) -> bool:
    """True when both numbers exist and agree up to float noise (`18.00` equals `18`)."""
    if extracted is None or gold is None:
        return False
    return math.isclose(extracted, gold, rel_tol=1e-9, abs_tol=1e-6)


def grade(response: str, reference: object, extractor: str = "default") -> Grade:
    extracted = extract_answer(response, extractor)
    return Grade(extracted, is_correct(extracted, reference_number(reference)))


# --- normalisation and number parsing -------------------------------------------------------


def _normalize(text: str) -> str:
    """Undo LaTeX and markdown spellings of numbers so one number regex reads them all."""
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    text = text.replace("\\$", "$").replace("\\%", "%")
    return _FRAC.sub(lambda m: f"{m[1].strip()}/{m[2].strip()}", text)


def _value(match: re.Match[str]) -> float | None:
    integer = re.sub(rf"[,{_SPACE_GROUP[1:-1]}]", "", match.group("int"))
    try:
        value = float(integer)
        if match.group("den"):
            denominator = float(match.group("den"))
            if denominator == 0:
                return None
            value /= denominator
    except (ValueError, OverflowError):
        return None
    if match.group("sign"):
        value = -value
    return value if math.isfinite(value) else None


def _numbers(text: str) -> list[float]:
    values = (_value(m) for m in _NUMBER.finditer(text))
    return [v for v in values if v is not None]


def _answer_at(text: str, match: re.Match[str]) -> float | None:
    """The number that an answer phrase introduces (`match`, the first one after it), or the
    result of an equation that starts there (`The answer is 3 + 4 = 7`)."""
    tail = _EQUATION_TAIL.match(text, match.end())
    if tail:
        result = _NUMBER.match(text, tail.end())
        if result:
            return _value(result)
    return _value(match)


# --- extraction rules -----------------------------------------------------------------------


def _boxed(text: str) -> float | None:
    """The last number inside the last `\\boxed{...}` that holds one (nested braces allowed)."""
    for start in reversed([m.end() for m in _BOXED.finditer(text)]):
        content = _balanced(text, start)
        numbers = _numbers(content) if _DIGIT.search(content) else []
        if numbers:
            return numbers[-1]
    return None


def _balanced(text: str, start: int, limit: int = 400) -> str:
    """The text up to the brace closing the one before `start` (at most `limit` chars: an
    answer is short, and unclosed braces must not make extraction quadratic)."""
    end = min(len(text), start + limit)
    depth = 1
    for brace in _BRACE.finditer(text, start, end):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start : brace.start()]
    return text[start:end]


def _after_last(pattern: re.Pattern[str]) -> Callable[[str], float | None]:
    """A rule: the answer after the last occurrence of `pattern` that is followed by one."""

    def rule(text: str) -> float | None:
        numbers = list(_NUMBER.finditer(text))
        starts = [number.start() for number in numbers]
        for phrase in reversed(list(pattern.finditer(text))):
            index = bisect_left(starts, phrase.end())
            value = _answer_at(text, numbers[index]) if index < len(numbers) else None
            if value is not None:
                return value
        return None

    return rule


def _last_number(text: str) -> float | None:
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _first_line_agreeing(text: str) -> float | None:
    """The paper's rule: the first non-empty line's number, when all its numbers agree."""
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    numbers = _numbers(first_line)
    if numbers and all(is_correct(n, numbers[0]) for n in numbers):
        return numbers[0]
    return None


_RULES: dict[str, list[Callable[[str], float | None]]] = {
    "default": [
        _boxed,
        _after_last(_HASHES),
        _after_last(_ANSWER_IS),
        _after_last(_ANSWER_COLON),
        _last_number,
    ],
    "paper": [_boxed, _first_line_agreeing, _after_last(_ANSWER_IS), _last_number],
}


# --- whole rows -----------------------------------------------------------------------------

REFERENCE_FIELDS = ("answer", "reference", "gold")


def grade_row(row: dict[str, Any], extractor: str = "default") -> dict[str, Any]:
    """A copy of `row` with `gold`, `extracted` and `correct` set from its `response` and its
    reference (`answer`, else `reference`, else `gold`); every other field is kept."""
    if "response" not in row:
        raise PrimekdError("row has no `response` field")
    field = next((name for name in REFERENCE_FIELDS if row.get(name) is not None), None)
    if field is None:
        raise PrimekdError("row has no reference: give it an `answer` (`#### N` or a number)")
    gold = reference_number(row[field])
    if gold is None:
        raise PrimekdError(f"row's `{field}` holds no number: {str(row[field])[-60:]!r}")
    extracted = extract_answer(row["response"], extractor)
    return {**row, "gold": gold, "extracted": extracted, "correct": is_correct(extracted, gold)}


def grade_file(path: str | Path, extractor: str = "default") -> list[dict[str, Any]]:
    """Grade every row of a JSONL file (see `grade_row`); errors name the file and line."""
    from primekd.io import iter_jsonl

    check_extractor(extractor)
    path = Path(path)
    if path.is_dir():
        raise PrimekdError(f"{path} is a directory; pass a JSONL file")
    graded = []
    for number, row in enumerate(iter_jsonl(path, tolerate_torn_tail=False), start=1):
        try:
            graded.append(grade_row(row, extractor))
        except PrimekdError as e:
            raise PrimekdError(f"{path}:{number}: {e}") from None
    if not graded:
        raise PrimekdError(f"{path} has no rows to grade")
    return graded
