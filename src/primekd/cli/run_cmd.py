"""`primekd run`: the whole experiment from a YAML config or a preset, ending in a report."""

from __future__ import annotations

import time
from datetime import datetime
from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from primekd.cli.app import app, console, err_console
from primekd.core.io import dumps
from primekd.experiment import estimate
from primekd.experiment.config import ExperimentConfig, load_config, preset_text
from primekd.experiment.runner import (
    RunSummary,
    checked_plan,
    missing_models_message,
    run_experiment,
    unfetched_models,
)
from primekd.experiment.stages import Stage

_STATE_TEXT = {
    "cached": "[green]cached[/]",
    "resume": "[yellow]resuming[/]",
    "changed": "[yellow]inputs changed: rerunning[/]",
    "new": "[cyan]running[/]",
}

_PLAN_TEXT = {
    "cached": "[green]skip (cached)[/]",
    "resume": "[yellow]resume[/]",
    "changed": "[yellow]rerun (inputs changed)[/]",
    "new": "[cyan]run[/]",
}


@app.command("run")
def run_command(
    config: Path | None = typer.Argument(
        None, help="Experiment config (YAML). Merged on top of --preset when both are given; "
        "without either, the `quick` preset runs.", show_default=False,
    ),
    preset: str | None = typer.Option(
        None, "--preset", metavar="NAME",
        help="Built-in config to start from: `quick` (bundled model, CPU, "
        "minutes, a demonstration), `small` (the paper's comparison on the bundled model, "
        "vLLM on CPU, 66 minutes measured), `small-onpolicy` (off- against on-policy "
        "students on the bundled model, 74 minutes measured), `pair` (a 1.5B teacher and "
        "a 0.5B student, sized by a power calculation; --dry-run estimates its time) or "
        "`paper` (the paper's full design, for a GPU).",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Run directory. Default: runs/<name from the config>.",
        show_default=False,
    ),
    overrides: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE",
        help="Override a config key, e.g. --set distill.alpha=0.5 or "
        "--set strategies=\\[none,teacher]. The value is read as YAML. Repeatable.",
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the complete config (the commented preset file "
        "when nothing is overridden) and exit without running.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the stages, whether each is cached, and how long each "
        "should take (from the config's `costs`: measured rates); run nothing.",
    ),
    force: bool = typer.Option(
        False, "--force",
        help="Run in a non-empty --out that primekd did not make, beside the files there "
        "(never overwriting or deleting them).",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object (stages, wall times, report paths) "
        "instead of progress and tables; each stage's start and end go to stderr.",
    ),
    only: list[str] = typer.Option(
        [], "--only", metavar="STAGE",
        help="Run only this stage (a name from --dry-run, or a glob such as "
        "'teacher/none/shard-*'); its upstream stages must be complete. Repeatable. Several "
        "`run --only` processes can share the run directory, e.g. one per teacher shard.",
        show_default=False,
    ),
) -> None:
    """Run the experiment: teachers per priming strategy, students, evaluation, attention
    analysis and the report. Finished stages are cached: rerunning resumes or skips them."""
    if print_config and config is None and not overrides:
        load_config(preset=preset or "quick")  # the shipped file must be valid
        typer.echo(preset_text(preset or "quick"), nl=False)
        return
    resolved = load_config(config, preset, overrides)
    if print_config:
        typer.echo("# primekd experiment config, resolved (preset, file and --set applied)")
        typer.echo(resolved.to_yaml(), nl=False)
        return
    run_dir = out or Path("runs") / resolved.name
    if dry_run:
        # a setting the run would refuse is refused here too
        _print_plan(resolved, checked_plan(resolved, run_dir), json_output)
        return
    # with --json, stdout is the JSON alone; the stages' start and end lines go to stderr,
    # so a long run's log says where it is
    summary = run_experiment(
        resolved, run_dir, progress=not json_output,
        callback=partial(_announce, err_console if json_output else console), force=force,
        only=only or None,
    )
    if json_output:
        typer.echo(dumps(summary.to_dict(), indent=2))
        return
    _print_summary(summary)


_started: dict[str, float] = {}


def _announce(out: Console, event: str, stage: Stage, index: int, total: int,
              state: str) -> None:
    name = stage.name
    if event == "start":
        _started[name] = time.perf_counter()
        if state != "cached":
            out.rule(f"[bold][{index}/{total}] {name}[/]", align="left", style="dim")
            out.print(f"  {_STATE_TEXT[state]} (at {datetime.now():%H:%M:%S})",
                      highlight=False)
        return
    if state == "cached":
        out.print(f"[dim][{index}/{total}][/] {name}: {_STATE_TEXT['cached']}",
                  highlight=False)
    else:
        seconds = time.perf_counter() - _started.pop(name, time.perf_counter())
        out.print(f"  [green]done[/] in {seconds:.1f} s", highlight=False)


def _print_plan(config: ExperimentConfig, stages: list[Stage], json_output: bool) -> None:
    estimates = estimate.estimate(config, stages)
    total = estimate.total(estimates)
    rows = [{"stage": s.name, "state": s.state(), "hash": s.hash, "directory": str(s.directory),
             "upstream": list(s.upstream), "estimate_s": e.seconds, "estimate_basis": e.basis}
            for s, e in zip(stages, estimates, strict=True)]
    missing = unfetched_models([s for s, row in zip(stages, rows, strict=True)
                                if row["state"] != "cached"])
    if json_output:
        typer.echo(dumps({"stages": rows, "estimate_total_s": total,
                          "models_not_fetched": missing}, indent=2))
        return
    table = Table(title="stages (--dry-run: nothing runs)")
    for header in ("stage", "would", "hash", "needs", "estimate", "counting"):
        table.add_column(header, justify="right" if header == "estimate" else "left",
                         overflow="fold")
    # stage names whole, on one line: they are what --only takes
    table.columns[0].min_width = max(len(row["stage"]) for row in rows)
    for row in rows:
        needs = row["upstream"]
        table.add_row(row["stage"], _PLAN_TEXT[row["state"]], row["hash"],
                      (", ".join(needs) or "-") if len(needs) <= 2
                      else f"{len(needs)} stages above", _minutes(row["estimate_s"]),
                      row["estimate_basis"])
    console.print(table)
    if missing:
        console.print(f"[yellow]Note:[/] {missing_models_message(missing)}.", highlight=False)
    longest = max((e for e in estimates if e.seconds is not None), key=lambda e: e.seconds,
                  default=None)
    if total is None:
        console.print("Estimate: incomplete: set the `costs` rates of the stages marked ? "
                      "(measured tokens/s, docs/run.md).", highlight=False)
    elif longest is not None:
        console.print(f"Estimate: {_minutes(total)} in all, the longest stage "
                      f"{longest.name} {_minutes(longest.seconds)} (from the config's "
                      "`costs`: rates measured on one machine; yours may differ).",
                      highlight=False)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _print_summary(summary: RunSummary) -> None:
    table = Table(title="primekd run")
    for header in ("stage", "status", "wall time (s)"):
        table.add_column(header, justify="right" if header.startswith("wall") else "left")
    for outcome in summary.stages:
        status = "cached" if not outcome.ran else {"new": "ran", "changed": "reran",
                                                    "resume": "resumed"}[outcome.state]
        table.add_row(outcome.name, status, f"{outcome.wall_time_s:.1f}")
    console.print(table)
    ran = sum(o.ran for o in summary.stages)
    reported = any(o.name == "report" for o in summary.stages)
    console.print(
        f"{ran} stage(s) ran, {len(summary.stages) - ran} cached, "
        f"{summary.wall_time_s:.1f} s. "
        + (f"Report: {summary.report_html}" if reported else "No report (--only)."),
        highlight=False,
    )
