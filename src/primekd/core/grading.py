"""Extract final numeric answers from model responses and grade them against references.

Extractors, each a list of rules tried in order; the first rule that finds a number wins:

- `default`: the last `\\boxed{...}`; the number after the last `####`; the number after the
  last "the (final|correct) answer is" (or "actually, it's"); the number after the last
  "Answer:"; the number after `A:` on the last line; the last number.
- `paper`: the precedence of Goyal et al. (2024): `\\boxed{...}`; a number on the first line
  when all the numbers there agree; "the (final|correct) answer is"; the last number.
- `math-verify`: Hugging Face's Math-Verify parser (a cross-check, see `cross_check`).

Every extraction says how it found its number (`found_by`): an explicit final-answer marker
(`MARKERS`) or only a `fallback` (the last number, the paper's first line). Grading rules:

- default: correct when the number is right and it was stated with a marker, or the answer
  is complete (did not stop at the token limit). A truncated answer without a marker is not
  correct (`no_answer: "truncated"`): its last number is wherever the cut fell.
- strict: a marker is required. flexible (`lenient=True`): any extracted number counts, as
  lm-evaluation-harness's flexible-extract does.

Numbers may carry `$`, `%`, units, thousands separators (`1,000`, `1 000`), a trailing
period, markdown bold, a minus sign, an exponent (`1e3`), or be a simple fraction (`3/4`,
`\\frac{3}{4}`) or a mixed number (`2 1/2`). Simple arithmetic in a box is evaluated.
Nothing here raises on any input string: a response without a number grades as incorrect.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from primekd.core.errors import PrimekdError
from primekd.core.io import iter_jsonl
from primekd.core.options import option
from primekd.core.stats import summarize

EXTRACTORS = ("default", "paper", "math-verify")

# How an answer can be stated explicitly; anything else a rule finds is a `fallback`.
MARKERS = ("boxed", "hashes", "answer_is", "answer_colon", "last_line_a")
FALLBACK = "fallback"
NO_NUMBER, TRUNCATED = "no_number", "truncated"
MATH_VERIFY_MAX_CHARS = 2000  # Math-Verify reads the tail; bounds its time off the main thread

# A minus sign counts only where it cannot be a hyphen or a subtraction (`10-15`, `x-5`).
_SIGN = r"(?:(?<![\w)\]}])[-\u2212])?"
_SPACE_GROUP = r"[ \u00a0\u2009\u202f]"
_INTEGER = (
    r"(?:\d{1,3}(?:,\d{3})+(?![\d,]\d)"  # 1,000,000
    # 1 000 000, but not `3 100-gram bags` (3 bags of 100 grams)
    rf"|\d{{1,3}}(?:{_SPACE_GROUP}\d{{3}})+(?![\d])(?!-[^\W\d_])"
    r"|\d+)"
)
_EXPONENT = r"(?:[eE][+-]?\d{1,3}(?![\w.]))?"  # 1e3, 2.5E-2
_NUMBER_SOURCE = (
    rf"(?P<sign>{_SIGN})(?:\$\s?)?"
    # a mixed number: `2 1/2` is 2.5
    r"(?:(?P<whole>\d+)[ \u00a0]+(?=\d+/\d+(?![\d/])))?"
    rf"(?P<int>{_INTEGER}(?:\.\d+)?{_EXPONENT}|(?<![\w.])\.\d+)"
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
_ANSWER_IS = re.compile(
    r"(?:(?:the\s+)?final\s+answer\s+is|the\s+(?:correct\s+)?answer\s+is"
    r"|\bactually,?\s+(?:it['\u2019]?s|it\s+is))\b\s*:?",
    re.IGNORECASE,
)
_ANSWER_COLON = re.compile(r"answer\**\s*:", re.IGNORECASE)
_LAST_LINE_A = re.compile(r"\s*[*_]*A[*_]*\s*:")
# Between an answer marker and its number, for the answer line to end where the number does.
_MARKER_GAP = re.compile(r"[\s:*_$\\(]*|[^\n]{0,40}")


class Extraction(NamedTuple):
    value: float | None
    found_by: str | None  # a kind in MARKERS, FALLBACK, or None when there is no number


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
    correct: bool  # under the chosen rule (default, or flexible when lenient)
    found_by: str | None = None  # marker kind, "fallback", or None (no number)
    no_answer: str | None = None  # "no_number" | "truncated" | None (an answer counts)
    truncated: bool | None = None  # stopped at the token limit; None when unknown
    correct_strict: bool = False  # right, and stated with an explicit marker
    correct_flexible: bool = False  # right by whatever number the extractor found


def extract(response: object, extractor: str = "default") -> Extraction:
    """The final numeric answer in a response and how it was found."""
    check_extractor(extractor)
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    text = _normalize(response)
    if extractor == "math-verify":
        marker = extract(response).found_by
        value = _math_verify(response)
        found_by = marker if marker in MARKERS else FALLBACK
        return Extraction(value, found_by if value is not None else None)
    for kind, rule in _RULES[extractor]:
        value = rule(text)
        if value is not None:
            return Extraction(value, kind if kind in MARKERS else FALLBACK)
    return Extraction(None, None)


def extract_answer(response: object, extractor: str = "default") -> float | None:
    """The final numeric answer in a response, or None when it has none."""
    return extract(response, extractor).value


def extractor_field() -> Any:
    """`--extractor`, the same in eval, teach, grade and compare."""
    return option("default", "How to find the final answer: `default` (boxed, ####, 'the "
                  "answer is', 'Answer:', last number), `paper` (the precedence of Goyal et "
                  "al. 2024: boxed, an agreeing first line, 'the answer is', last number) or "
                  "`math-verify` (Hugging Face's Math-Verify).", choices=EXTRACTORS,
                  metavar="NAME")


def lenient_field() -> Any:
    """`--lenient`, the same in eval, teach, grade and compare."""
    return option(False, "Count a truncated answer's last number as its answer (the flexible "
                  "rule of lm-evaluation-harness). By default an answer that hit the token "
                  "limit (`finish_reason: length`) without a stated answer is wrong.",
                  flags=("--lenient",))


@dataclass
class GradingRule:
    """The options of `grade` and `compare`: how rows that carry no `correct` field yet are
    graded (`grade_file` and `compare_files` check the extractor)."""

    extractor: str = extractor_field()
    lenient: bool = lenient_field()


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


def is_truncated(finish_reason: object) -> bool | None:
    """True for an answer cut at the token limit, None when the reason is unknown."""
    if finish_reason is None:
        return None
    return finish_reason == "length"


def grade(response: object, reference: object, extractor: str = "default",
          finish_reason: str | None = None, lenient: bool = False) -> Grade:
    """Grade one response. `finish_reason` "length" marks an answer cut at the token limit:
    without a marker it is not correct (unless `lenient`)."""
    found = extract(response, extractor)
    right = is_correct(found.value, reference_number(reference))
    truncated = is_truncated(finish_reason)
    marked = found.found_by in MARKERS
    no_answer = NO_NUMBER if found.value is None else (
        TRUNCATED if truncated and not marked else None)
    correct = right if lenient else right and no_answer is None
    return Grade(found.value, correct, found.found_by, no_answer, truncated,
                 right and marked, right)


# --- where the answer line ends (for stopping generation there) ------------------------------


def answer_line_end(text: str) -> int | None:
    """The index of the newline that ends the first line stating a final answer with an
    explicit marker (`The answer is 18.`, `#### 18`, `\\boxed{18}`, `Answer: 18`), or None
    while there is no such complete line. Cutting `text` there keeps the whole answer line."""
    markers = _answer_markers(text)
    if not markers:
        return None
    newline = text.find("\n", min(end for _, end in markers))
    return None if newline < 0 else newline


def _answer_markers(text: str) -> list[tuple[int, int]]:
    """(start, end) of the first explicit final-answer marker of each kind (`####`,
    `The answer is`, `Answer:`, `\\boxed{}`) that states a number: from the marker to the end
    of its number (or the closing brace)."""
    markers = []
    for pattern in (_HASHES, _ANSWER_IS, _ANSWER_COLON):
        for phrase in pattern.finditer(text):
            # bounded window: many markers without numbers must not make this quadratic
            number = _NUMBER.search(text, phrase.end(), phrase.end() + 120)
            if number and _MARKER_GAP.fullmatch(text, phrase.end(), number.start()):
                markers.append((phrase.start(), number.end()))
                break
    for box in _BOXED.finditer(text):
        close = _closing_brace(text, box.end())
        if close is not None and _DIGIT.search(text, box.end(), close):
            markers.append((box.start(), close))
            break
    return markers


_DIGITS = re.compile(r"\d+")
LOOP_WINDOW, LOOP_NGRAM, LOOP_DISTINCT = 120, 6, 0.5


def looping(text: str) -> bool:
    """Whether an answer ends in a repetition loop ("Step 27: Calculate the number of ...",
    "Step 28: Determine the number of ..." on and on): among the word 6-grams of its last
    120 words (numbers made equal), fewer than half are distinct. Measured on 351 answers of
    SmolLM2-135M at 512 tokens: the answers cut at the limit scored 0.03-0.40 (35 of 39) or
    0.52-0.78, the complete ones 0.28-1.0, mostly above 0.9. A looping answer cut at the
    token limit was not cut short: no budget would have let it finish."""
    words = _DIGITS.sub("0", text).split()[-LOOP_WINDOW:]
    if len(words) < LOOP_WINDOW // 2:
        return False
    grams = [tuple(words[i:i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1)]
    return len(set(grams)) / len(grams) < LOOP_DISTINCT


def answer_line_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the first line that states a final answer with an explicit marker,
    whether or not a newline ends it yet (a stored answer cut at its answer line does not
    end in one); None when no line states one."""
    markers = _answer_markers(text)
    if not markers:
        return None
    first = min(start for start, _ in markers)
    start = text.rfind("\n", 0, first) + 1
    end = text.find("\n", first)
    return start, len(text) if end < 0 else end


def working_text(text: str) -> str | None:
    """The answer's working: everything outside its final-answer line (see
    `answer_line_span`), or None when no line states a final answer."""
    span = answer_line_span(text)
    if span is None:
        return None
    return (text[:span[0]] + text[span[1]:]).strip()


def _closing_brace(text: str, start: int, limit: int = 400) -> int | None:
    depth = 1
    for brace in _BRACE.finditer(text, start, min(len(text), start + limit)):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return brace.start()
    return None


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
        if match.group("whole"):
            value += float(match.group("whole"))
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


# --- arithmetic inside a box ----------------------------------------------------------------

_ARITHMETIC = re.compile(r"[\d.\s+\-*/()]{1,80}")
_OPERATION = re.compile(r"[\d)]\s*[-+*/]\s*[\d(.]")
_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def _box_arithmetic(content: str) -> float | None:
    """The value of simple arithmetic in a box (`10-3` is 7, `x = 3 \\times 4` is 12), or
    None when the content is not plain arithmetic."""
    expression = content.rsplit("=", 1)[-1]
    for latex, symbol in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\u00d7", "*"),
                          ("\u00f7", "/"), ("\u2212", "-")):
        expression = expression.replace(latex, symbol)
    expression = re.sub(r"\\text\s*\{[^{}]*\}|\\[a-zA-Z]+|[${}%]", " ", expression)
    expression = re.sub(r"(?<=\d),(?=\d{3})", "", expression).strip().rstrip(".").strip()
    if not (_ARITHMETIC.fullmatch(expression) and _OPERATION.search(expression)):
        return None
    try:
        value = _evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _evaluate(node: ast.AST) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if left is None or right is None:
            return None
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        operand = _evaluate(node.operand)
        return None if operand is None else _OPERATORS[type(node.op)](operand)
    return None


# --- extraction rules -----------------------------------------------------------------------


def _boxed(text: str) -> float | None:
    """The last `\\boxed{...}` that holds a number: its arithmetic evaluated, else its last
    number (nested braces allowed)."""
    for start in reversed([m.end() for m in _BOXED.finditer(text)]):
        content = _balanced(text, start)
        if not _DIGIT.search(content):
            continue
        value = _box_arithmetic(content)
        if value is not None:
            return value
        numbers = _numbers(content)
        if numbers:
            return numbers[-1]
    return None


def _balanced(text: str, start: int, limit: int = 400) -> str:
    """The text up to the brace closing the one before `start` (at most `limit` chars: an
    answer is short, and unclosed braces must not make extraction quadratic)."""
    close = _closing_brace(text, start, limit)
    return text[start: close if close is not None else min(len(text), start + limit)]


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


def _last_line_a(text: str) -> float | None:
    """`A: 18` on the last non-empty line (the few-shot `Q:`/`A:` format)."""
    lines = [line for line in text.splitlines() if line.strip()]
    match = _LAST_LINE_A.match(lines[-1]) if lines else None
    number = _NUMBER.search(lines[-1], match.end()) if match else None
    return _answer_at(lines[-1], number) if number else None


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


Rule = tuple[str, Callable[[str], float | None]]
_RULES: dict[str, list[Rule]] = {
    "default": [
        ("boxed", _boxed),
        ("hashes", _after_last(_HASHES)),
        ("answer_is", _after_last(_ANSWER_IS)),
        ("answer_colon", _after_last(_ANSWER_COLON)),
        ("last_line_a", _last_line_a),
        ("last_number", _last_number),
    ],
    "paper": [("boxed", _boxed), ("first_line", _first_line_agreeing),
              ("answer_is", _after_last(_ANSWER_IS)), ("last_number", _last_number)],
}


# --- Math-Verify ----------------------------------------------------------------------------


def _math_verify(response: str) -> float | None:
    """The number Math-Verify parses from the response, or None. Never raises: its SIGALRM
    timeout works only in the main thread, so elsewhere it runs without one, on a bounded
    tail of the text. Gold is never given to Math-Verify: the caller compares numbers."""
    try:
        from math_verify import parse
    except ImportError:
        raise PrimekdError("--extractor math-verify needs the `math-verify` package "
                           "(pip install math-verify)") from None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    in_main = threading.current_thread() is threading.main_thread()
    try:
        parsed = parse(response[-MATH_VERIFY_MAX_CHARS:], parsing_timeout=5 if in_main else None)
    except Exception:  # noqa: BLE001 - a verifier must never take grading down
        return None
    for item in parsed:
        value = _sympy_float(item)
        if value is not None:
            return value
    return None


def _sympy_float(item: object) -> float | None:
    try:
        if not getattr(item, "is_number", False) or getattr(item, "is_real", None) is False:
            return None
        value = float(item)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - sets, intervals, symbols: no single number
        return None
    return value if math.isfinite(value) else None


# --- whole rows -----------------------------------------------------------------------------

REFERENCE_FIELDS = ("answer", "reference", "gold")


def row_finish_reason(row: dict[str, Any]) -> str | None:
    """A row's finish reason: `finish_reason`, else from a boolean `truncated`, else None."""
    reason = row.get("finish_reason")
    if isinstance(reason, str):
        return reason
    truncated = row.get("truncated")
    return None if not isinstance(truncated, bool) else ("length" if truncated else "stop")


def row_gold(row: dict[str, Any]) -> float:
    field = next((name for name in REFERENCE_FIELDS if row.get(name) is not None), None)
    if field is None:
        raise PrimekdError("row has no reference: give it an `answer` (`#### N` or a number)")
    gold = reference_number(row[field])
    if gold is None:
        raise PrimekdError(f"row's `{field}` holds no number: {str(row[field])[-60:]!r}")
    return gold


def grade_row(row: dict[str, Any], extractor: str = "default", lenient: bool = False
              ) -> dict[str, Any]:
    """A copy of `row` with the grading fields set from its `response`, its reference
    (`answer`, else `reference`, else `gold`) and its `finish_reason` (or `truncated`);
    every other field is kept."""
    if "response" not in row:
        raise PrimekdError("row has no `response` field")
    gold = row_gold(row)
    graded = grade(row["response"], gold, extractor, row_finish_reason(row), lenient)
    return {**row, "gold": gold, **grade_fields(graded)}


def grade_fields(graded: Grade) -> dict[str, Any]:
    """The fields a graded row carries."""
    return {"extracted": graded.extracted, "correct": graded.correct,
            "found_by": graded.found_by, "no_answer": graded.no_answer,
            "truncated": graded.truncated, "correct_strict": graded.correct_strict,
            "correct_flexible": graded.correct_flexible}


def grade_file(path: str | Path, extractor: str = "default", lenient: bool = False
               ) -> list[dict[str, Any]]:
    """Grade every row of a JSONL file (see `grade_row`); errors name the file and line."""
    check_extractor(extractor)
    path = Path(path)
    if path.is_dir():
        raise PrimekdError(f"{path} is a directory; pass a JSONL file")
    graded = []
    for number, row in enumerate(iter_jsonl(path, tolerate_torn_tail=False), start=1):
        try:
            graded.append(grade_row(row, extractor, lenient))
        except PrimekdError as e:
            raise PrimekdError(f"{path}:{number}: {e}") from None
    if not graded:
        raise PrimekdError(f"{path} has no rows to grade")
    return graded


def summarize_grades(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy under the rows' `correct` with its Wilson interval, strict and flexible
    accuracy, and how many answers were truncated, had no number, or had no accepted answer.
    `truncation_known` is False when no row said whether it hit the token limit."""
    n = len(rows)
    summary = summarize([bool(r.get("correct")) for r in rows],
                        no_answer=sum(r.get("no_answer") is not None for r in rows))
    strict = sum(bool(r.get("correct_strict")) for r in rows)
    flexible = sum(bool(r.get("correct_flexible")) for r in rows)
    known = sum(isinstance(r.get("truncated"), bool) for r in rows)
    return {**summary,
            "correct_strict": strict, "accuracy_strict": strict / n if n else 0.0,
            "correct_flexible": flexible, "accuracy_flexible": flexible / n if n else 0.0,
            "truncated": sum(r.get("truncated") is True for r in rows),
            "truncated_no_marker": sum(r.get("no_answer") == TRUNCATED for r in rows),
            "no_number": sum(r.get("no_answer") == NO_NUMBER or r.get("extracted") is None
                             for r in rows),
            "truncation_known": known == n and n > 0,
            "truncation_unknown_rows": n - known}


# --- agreement between extractors -----------------------------------------------------------


def cross_check(rows: Sequence[dict[str, Any]], extractors: Iterable[str] = EXTRACTORS,
                lenient: bool = False, examples: int = 5) -> dict[str, Any]:
    """Grade every row with each extractor; for each pair, the rows on which they disagree
    about correctness, with up to `examples` rows of each kind."""
    extractors = list(extractors)
    for name in extractors:
        check_extractor(name)
    graded = {name: [grade(r.get("response"), row_gold(r), name, row_finish_reason(r),
                           lenient) for r in rows] for name in extractors}
    pairs = []
    for i, a in enumerate(extractors):
        for b in extractors[i + 1:]:
            only_a = [k for k, (x, y) in enumerate(zip(graded[a], graded[b], strict=True))
                      if x.correct and not y.correct]
            only_b = [k for k, (x, y) in enumerate(zip(graded[a], graded[b], strict=True))
                      if y.correct and not x.correct]
            shown = {kind: [_example(rows[k], graded, a, b, k) for k in keys[:examples]]
                     for kind, keys in (("only_a_correct", only_a), ("only_b_correct", only_b))}
            pairs.append({"a": a, "b": b, "disagree": len(only_a) + len(only_b),
                          "only_a_correct": len(only_a), "only_b_correct": len(only_b),
                          "examples": shown})
    n = len(rows)
    return {"n": n, "extractors": extractors,
            "accuracy": {name: sum(g.correct for g in graded[name]) / n if n else 0.0
                         for name in extractors},
            "pairs": pairs}


def _example(row: dict[str, Any], graded: dict[str, list[Grade]], a: str, b: str, k: int
             ) -> dict[str, Any]:
    response = row.get("response")
    text = "" if response is None else str(response)
    return {"row": k + 1, "id": row.get("id"), "gold": row_gold(row),
            a: graded[a][k].extracted, b: graded[b][k].extracted,
            "response_tail": text[-160:]}
