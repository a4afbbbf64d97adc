"""`primekd grade`: grade existing model outputs against their references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from primekd.cli.app import app, console
from primekd.core import grading, options
from primekd.core.grading import GradingRule, grade_file, summarize_grades
from primekd.core.io import atomic_write_text


def _grade(given: dict[str, Any], file: Path, cross_check: bool, out: Path | None,
           json_output: bool) -> None:
    rule = GradingRule(**given)
    rows = grade_file(file, rule.extractor, rule.lenient)
    summary = {**summarize_grades(rows), "extractor": rule.extractor,
               "grading": "lenient" if rule.lenient else "default"}
    if cross_check:
        summary["cross_check"] = grading.cross_check(rows, lenient=rule.lenient)
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if json_output:
        print(json.dumps(summary))
        return
    for line in summary_lines(summary):
        console.print(line, highlight=False)
    if cross_check:
        console.print(cross_check_table(summary["cross_check"]))
    if out is not None:
        console.print(f"graded rows written to {out}", highlight=False)


app.command("grade")(options.command(GradingRule, [
    options.argument("file", help="JSONL, one row per question, with `response` and `answer` "
                     "(a GSM8K solution ending `#### N`, or a bare number; `reference` or "
                     "`gold` also work). Other fields, such as `question`, are kept."),
    options.extra("cross_check", "--cross-check", default=False, annotation=bool,
                  help="Also grade with every extractor (default, paper, math-verify) and "
                  "list, for each pair, the rows on which they disagree, with up to 5 examples "
                  "of each kind."),
    options.extra("out", "--out", annotation=Path | None, metavar="FILE",
                  help="Write the graded rows here as JSONL: every input field plus `gold`, "
                  "`extracted` (number or null), `correct`, `found_by`, `no_answer`, "
                  "`truncated`, `correct_strict` and `correct_flexible`."),
    options.extra("json_output", "--json", default=False, annotation=bool,
                  help='Print one JSON object: {"n", "correct", "accuracy", "ci95": [lo, hi], '
                  '"no_answer", "accuracy_strict", "accuracy_flexible", "truncated", '
                  '"no_number", ...} (every key in docs/grading.md).'),
], _grade, "Grade model outputs from any source: extract each final number and check it."))


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The human summary of `grade`: accuracy under the rule, strict/flexible beside it,
    and what truncation did."""
    lo, hi = s["ci95"]
    lines = [
        f"[bold]{s['correct']}/{s['n']}[/] correct: [bold]{100 * s['accuracy']:.1f}%[/] "
        f"(95% CI {100 * lo:.1f}–{100 * hi:.1f}%), grading {s['grading']}, "
        f"extractor {s['extractor']}",
        f"strict (stated answer only) {100 * s['accuracy_strict']:.1f}%, flexible (last "
        f"number anywhere) {100 * s['accuracy_flexible']:.1f}%",
    ]
    if s["truncation_known"]:
        lines.append(f"{s['truncated']} truncated at the token limit "
                     f"({s['truncated_no_marker']} without a stated answer), "
                     f"{s['no_number']} without any number")
    else:
        lines.append(f"[yellow]truncation unknown for {s['truncation_unknown_rows']} row(s) "
                     "(no `finish_reason` or `truncated` field): graded as complete answers"
                     f"[/]; {s['no_number']} without any number")
    return lines


def cross_check_table(result: dict[str, Any]) -> Table:
    table = Table(title="extractor agreement (rows graded differently)", title_justify="left")
    for header in ("extractors", "disagree", "only first correct", "only second correct",
                   "examples (row: gold, first, second)"):
        table.add_column(header, justify="left" if header.startswith("ex") else "right",
                         no_wrap=header == "extractors")  # the pair's name stays on one line
    for pair in result["pairs"]:
        a, b = pair["a"], pair["b"]
        shown = [f"{e['row']}: {_n(e['gold'])}, {_n(e[a])}, {_n(e[b])}"
                 for kind in ("only_a_correct", "only_b_correct")
                 for e in pair["examples"][kind]]
        table.add_row(f"{a} vs {b}", str(pair["disagree"]), str(pair["only_a_correct"]),
                      str(pair["only_b_correct"]), "; ".join(shown) or "–")
    return table


def _n(value: float | None) -> str:
    if value is None:
        return "none"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
