"""`primekd eval`: answer GSM8K (or any question/answer JSONL) with a model, grade, save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from primekd.cli.app import app, console
from primekd.core import options
from primekd.core.io import dumps
from primekd.evaluate.evaluator import EvalConfig, evaluate


def _eval(given: dict[str, Any], json_output: bool) -> None:
    config = EvalConfig(**given)
    summary = evaluate(config, progress=True)
    if json_output:
        print(dumps(summary))
    else:
        _print_summary(summary, Path(config.out))


app.command("eval")(options.command(EvalConfig, [
    options.extra("json_output", "--json", default=False, annotation=bool,
                  help="Print summary.json to stdout instead of a table."),
], _eval, "Answer questions with a model (+ adapter), grade them, and write results + summary."))


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    lo, hi = summary["ci95"]
    rate = summary.get("tokens_per_s")
    speed = f", {rate:.1f} tokens/s" if rate else ""
    console.print(
        f"[bold]{summary['correct']}/{summary['n']}[/] correct: "
        f"[bold]{100 * summary['accuracy']:.1f}%[/] (95% CI {100 * lo:.1f}–{100 * hi:.1f}%), "
        f"{summary['no_answer']} without an answer, {summary['truncated']} cut at "
        f"--max-new-tokens{speed}",
        highlight=False,
    )
    console.print(
        f"strict (stated answer only) {100 * summary['accuracy_strict']:.1f}%, flexible "
        f"(last number anywhere) {100 * summary['accuracy_flexible']:.1f}%, grading "
        f"{summary['grading']}", highlight=False)
    console.print(f"results in {out / 'results.jsonl'}, summary in {out / 'summary.json'}",
                  highlight=False)
