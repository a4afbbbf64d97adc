"""Markdown for the reports: tables (a header, a rule that right-aligns the numbers, rows) and
the percentages in their cells."""

from __future__ import annotations

from typing import Any


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """`align` has one letter per column, l or r; by default the first column is left-aligned
    and the rest right-aligned."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines)


def cell(value: Any) -> str:
    text = "–" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def percent(x: float | None, digits: int = 1) -> str:
    """A share as a percentage, "–" for none."""
    return "–" if x is None else f"{100 * x:.{digits}f}%"
