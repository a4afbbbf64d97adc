"""`primekd compare`: accuracy per results file and paired tests against a reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from primekd.analyze.compare import compare_files, render_comparison
from primekd.cli.app import app, console, err_console
from primekd.core import options
from primekd.core.grading import GradingRule


def _compare(given: dict[str, Any], files: list[Path], reference: Path | None, match: str,
             bootstrap: int, seed: int, power_diff: float | None, target_power: float,
             json_output: bool) -> None:
    rule = GradingRule(**given)
    with err_console.status(f"comparing {len(files)} file(s), {bootstrap} bootstrap resamples"):
        comparison = compare_files(files, reference, rule.extractor, match, bootstrap, seed,
                                   rule.lenient, power_diff, target_power)
    if json_output:
        print(json.dumps(comparison.to_dict()))
    else:
        console.print(render_comparison(comparison))


app.command("compare")(options.command(GradingRule, [
    options.argument("files", annotation=list[Path], help="Results files (JSONL, one row per "
                     "question): `results.jsonl` from `primekd eval`, or any rows with "
                     "`response` and `answer`; rows without a `correct` field are graded here "
                     "(--extractor, --lenient)."),
    options.extra("reference", "--reference", annotation=Path | None, metavar="FILE",
                  help="The file the others are compared with (default: the first file); "
                  "added to the list if it is not in it."),
    options.extra("match", "--match", default="auto", metavar="HOW",
                  help="How rows are paired across files: `id`, `question` "
                  "(whitespace-normalised text), or `auto` (ids where both files have them, "
                  "else question text)."),
    options.extra("bootstrap", "--bootstrap", default=10_000, annotation=int,
                  help="Resamples for the paired bootstrap interval (>= 100)."),
    options.extra("seed", "--seed", default=0, annotation=int,
                  help="Random seed of the bootstrap."),
    options.extra("power_diff", "--power-diff", annotation=float | None, metavar="POINTS",
                  help="Also say, per file, the power to detect a difference of this many "
                  "percentage points at the discordance measured against the reference (share "
                  "of questions only one of the two got right), and how many questions "
                  "--power needs: exact McNemar at alpha 0.05 divided by the number of "
                  "comparisons (Holm's first step). Use it to size a run from a pilot."),
    options.extra("target_power", "--power", default=0.8, annotation=float,
                  help="The power --power-diff sizes for."),
    options.extra("json_output", "--json", default=False, annotation=bool,
                  help="Print one JSON object (files, pairwise comparisons, unmatched "
                  "questions) instead of a table."),
], _compare, "Accuracy with Wilson 95% intervals per file; against the reference, the "
    "difference in points, exact McNemar p, a paired bootstrap 95% interval and Holm-adjusted "
    "p."))
