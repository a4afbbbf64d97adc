"""`primekd compare`: accuracy per results file and paired tests against a reference."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from primekd.analyze.compare import compare_files, render_comparison
from primekd.cli.app import app, console, err_console


@app.command("compare")
def compare_command(
    files: list[Path] = typer.Argument(
        ...,
        help="Results files (JSONL, one row per question): `results.jsonl` from "
        "`primekd eval`, or any rows with `response` and `answer`, graded on the fly.",
        show_default=False,
    ),
    reference: Path | None = typer.Option(
        None,
        "--reference",
        metavar="FILE",
        help="The file the others are compared with (default: the first file); added to "
        "the list if it is not in it.",
    ),
    match: str = typer.Option(
        "auto",
        "--match",
        metavar="HOW",
        help="How rows are paired across files: `id`, `question` (whitespace-normalised "
        "text), or `auto` (ids where both files have them, else question text).",
    ),
    extractor: str = typer.Option(
        "default",
        "--extractor",
        metavar="NAME",
        help="Extractor for rows that have no `correct` field: `default`, `paper` or "
        "`math-verify`.",
    ),
    lenient: bool = typer.Option(
        False, "--lenient",
        help="For rows graded here: count a truncated answer's last number (harness-style).",
    ),
    bootstrap: int = typer.Option(
        10_000, "--bootstrap", metavar="INTEGER",
        help="Resamples for the paired bootstrap interval (>= 100)."
    ),
    seed: int = typer.Option(0, "--seed", metavar="INTEGER",
                             help="Random seed of the bootstrap."),
    json_output: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object (files, pairwise comparisons, unmatched questions) "
        "instead of a table.",
    ),
) -> None:
    """Accuracy with Wilson 95% intervals per file; against the reference, the difference
    in points, exact McNemar p, a paired bootstrap 95% interval and Holm-adjusted p."""
    with err_console.status(f"comparing {len(files)} file(s), {bootstrap} bootstrap resamples"):
        comparison = compare_files(files, reference, extractor, match, bootstrap, seed,
                                   lenient)
    if json_output:
        print(json.dumps(comparison.to_dict()))
    else:
        console.print(render_comparison(comparison))
