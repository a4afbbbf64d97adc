"""Extract final numeric answers from model responses and grade them.

(Placeholder API; the full extractor is built in issue 3.)
"""

from __future__ import annotations

import re

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
