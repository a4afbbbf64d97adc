"""`primekd teach`: run a teacher under a priming strategy and write a teacher store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from primekd.cli.app import app, console
from primekd.core import options
from primekd.core.errors import PrimekdError
from primekd.core.io import dumps
from primekd.teach.priming import all_strategies
from primekd.teach.teacher import TeachConfig, teach


def _teach(given: dict[str, Any], list_strategies: bool, as_json: bool) -> None:
    if list_strategies:
        _print_strategies(given.get("strategies_file"), as_json)
        return
    if "teacher" not in given or "out" not in given:
        raise PrimekdError("primekd teach needs --teacher and --out "
                           "(or --list-strategies); see primekd teach --help")
    config = TeachConfig(**given)
    manifest = teach(config, progress=True)
    if as_json:
        print(dumps(manifest, indent=2, ensure_ascii=False))
    else:
        _print_summary(manifest, config.out)


app.command("teach")(options.command(TeachConfig, [
    options.extra("list_strategies", "--list-strategies", default=False, annotation=bool,
                  help="Print every strategy with its exact text and exit."),
    options.extra("as_json", "--json", default=False, annotation=bool,
                  help="Print the manifest as JSON."),
], _teach, "Run a teacher under a priming strategy and write a teacher store (resumable).",
    require=False))


def _print_strategies(strategies_file: Path | None, as_json: bool) -> None:
    strategies = all_strategies(strategies_file)
    if as_json:
        print(dumps([s.to_dict() for s in strategies.values()], indent=2,
                         ensure_ascii=False))
        return
    for s in strategies.values():
        console.rule(f"[bold]{s.name}[/]: {s.description}", align="left")
        if s.system:
            console.print("system: " + s.system, highlight=False, markup=False)
        console.print(s.user, highlight=False, markup=False)
        if s.prefill:
            console.print("prefill: " + s.prefill, highlight=False, markup=False)


def _print_summary(manifest: dict, out: Path) -> None:
    counts = manifest["counts"]
    accuracy = manifest["teacher_accuracy"]
    table = Table(title=f"teacher store {out}", show_header=False)
    table.add_row("strategy", manifest["strategy"]["name"])
    table.add_row("target", manifest["target"])
    table.add_row("rows (kept / answered)", f"{counts['kept']} / {counts['rows']}")
    table.add_row("teacher accuracy",
                  "n/a (reference)" if accuracy is None else f"{accuracy:.1%}")
    table.add_row("mean answer tokens", f"{manifest['mean_answer_tokens'] or 0:.1f}")
    rate = manifest["generation_tokens_per_s"]
    table.add_row("generation tokens/s", "n/a" if rate is None else f"{rate:.1f}")
    table.add_row("wall time", f"{manifest['wall_time_s']:.1f} s")
    table.add_row("complete", str(manifest["complete"]))
    console.print(table)
