"""`primekd grade`: grade existing model outputs against their references."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from primekd.cli.app import app, console
from primekd.grading import grade_file
from primekd.io import atomic_write_text
from primekd.stats import summarize


@app.command("grade")
def grade_command(
    file: Path = typer.Argument(
        ...,
        help="JSONL, one row per question, with `response` and `answer` (a GSM8K solution "
        "ending `#### N`, or a bare number; `reference` or `gold` also work). "
        "Other fields, such as `question`, are kept.",
        show_default=False,
    ),
    extractor: str = typer.Option(
        "default",
        "--extractor",
        help="How to find the final answer: `default` (boxed, ####, 'the answer is', "
        "'Answer:', last number) or `paper` (Goyal et al. 2024: boxed, an agreeing first "
        "line, 'the answer is', last number).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Write the graded rows here as JSONL: every input field plus `gold`, "
        "`extracted` (number or null) and `correct`.",
    ),
    json_output: bool = typer.Option(
        False,
        "--json",
        help='Print one JSON object: {"n", "correct", "accuracy", "ci95": [lo, hi], '
        '"no_answer"}.',
    ),
) -> None:
    """Grade model outputs from any source: extract each final number and check it."""
    rows = grade_file(file, extractor)
    summary = summarize([row["correct"] for row in rows],
                        no_answer=sum(row["extracted"] is None for row in rows))
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if json_output:
        print(json.dumps(summary))
        return
    lo, hi = summary["ci95"]
    console.print(
        f"[bold]{summary['correct']}/{summary['n']}[/] correct: "
        f"[bold]{100 * summary['accuracy']:.1f}%[/] (95% CI {100 * lo:.1f}–{100 * hi:.1f}%), "
        f"{summary['no_answer']} without an answer, extractor {extractor}",
        highlight=False,
    )
    if out is not None:
        console.print(f"graded rows written to {out}", highlight=False)
