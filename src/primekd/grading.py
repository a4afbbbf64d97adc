"""Extract final numeric answers from model responses and grade them.

(Placeholder API; the full extractor is built in issue 3.)
"""

from __future__ import annotations

import re
from typing import NamedTuple

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    match = _NUMBER.search(text.replace("$", ""))
    if not match:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def reference_number(answer: str) -> float | None:
    """The gold number of a reference: the part after `####`, or a bare number."""
    tail = answer.rsplit("####", 1)[-1]
    return parse_number(tail)


class Grade(NamedTuple):
    extracted: float | None
    correct: bool


def extract_answer(response: str, extractor: str = "default") -> float | None:
    """The final numeric answer in a response, or None (placeholder: last number)."""
    numbers = _NUMBER.findall(response.replace("$", ""))
    return parse_number(numbers[-1]) if numbers else None


def is_correct(extracted: float | None, gold: float | None) -> bool:
    return extracted is not None and gold is not None and abs(extracted - gold) < 1e-6


def grade(response: str, reference: str, extractor: str = "default") -> Grade:
    extracted = extract_answer(response, extractor)
    return Grade(extracted, is_correct(extracted, reference_number(reference)))
