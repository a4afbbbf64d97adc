"""The report's "Answer style" section: which answers are Python programs, and which print
an output the model wrote itself.

A code model often answers a word problem with a program followed by an ```output block.
Nothing runs the program: the output is the model's own guess at what it prints, and the
final answer rests on that guess. Students distilled from such a teacher learn the habit (the
`pair` preset's unprimed Qwen2.5-Coder teacher answered 35% of its train questions this
way). The section counts, per teacher strategy and per evaluated model, the answers with a
Python block and those with an output block, and the accuracy with and without code, so a
report can show where a student's style came from. It is left out when no answer has code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primekd.core.errors import PrimekdError
from primekd.core.markdown import percent, table
from primekd.teach import store

_PYTHON_FENCE = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py)\b", re.IGNORECASE | re.MULTILINE)
_OUTPUT_FENCE = re.compile(r"^[ \t]*```[ \t]*output\b", re.IGNORECASE | re.MULTILINE)


def has_program(text: str) -> bool:
    """Whether an answer contains a fenced Python block."""
    return bool(_PYTHON_FENCE.search(text))


def has_written_output(text: str) -> bool:
    """Whether an answer contains an ```output block: a program's output that the model
    wrote, since nothing ran the program."""
    return bool(_OUTPUT_FENCE.search(text))


@dataclass(frozen=True)
class StyleCounts:
    answers: int
    programs: int
    written_outputs: int
    correct_with_program: int
    correct_without_program: int

    @property
    def accuracy_with_program(self) -> float | None:
        return self.correct_with_program / self.programs if self.programs else None

    @property
    def accuracy_without_program(self) -> float | None:
        prose = self.answers - self.programs
        return self.correct_without_program / prose if prose else None


def count(rows: Iterable[Mapping[str, Any]]) -> StyleCounts:
    """Counts over rows with a `response` and a `correct` field (eval results, teacher
    store rows)."""
    answers = programs = outputs = right_code = right_prose = 0
    for row in rows:
        text, correct = str(row.get("response") or ""), bool(row.get("correct"))
        program = has_program(text)
        answers += 1
        programs += program
        outputs += has_written_output(text)
        right_code += program and correct
        right_prose += (not program) and correct
    return StyleCounts(answers, programs, outputs, right_code, right_prose)


def teacher_rows(directory: Path) -> list[dict[str, Any]]:
    """A teacher stage's stored answers (its shards' for a sharded teacher); none when the
    store is missing or unreadable, so the report still renders."""
    try:
        return list(store.iter_store_rows(store.stage_stores(directory),
                                          columns=["response", "correct"]))
    except (PrimekdError, OSError, ValueError):
        return []


def section(teachers: Mapping[str, Iterable[Mapping[str, Any]]],
            models: Mapping[str, Iterable[Mapping[str, Any]]]) -> str:
    """The "Answer style" section, or "" when no answer of any teacher or model has code."""
    counted = [(f"teacher `{name}`", count(rows)) for name, rows in teachers.items()]
    counted += [(f"`{name}`", count(rows)) for name, rows in models.items()]
    if not any(c.programs for _, c in counted):
        return ""
    body = [[label, str(c.answers), _share(c.programs, c.answers),
             _share(c.written_outputs, c.answers), percent(c.accuracy_with_program),
             percent(c.accuracy_without_program)] for label, c in counted if c.answers]
    headers = ["answers of", "answers", "with a Python program", "with an output it wrote",
               "accuracy with a program", "accuracy without"]
    return ("## Answer style\n\nAnswers that contain a fenced Python program, and answers "
            "with a fenced block labelled `output`. Nothing runs the program: that output is "
            "the model's own guess at what it prints, and the answer after it rests on the "
            "guess. Teacher rows are the transfer-set answers each student learned from, "
            "model rows the test answers graded above. A descriptive count, not a test.\n\n"
            + table(headers, body) + "\n")


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}% ({part})" if whole else "–"
