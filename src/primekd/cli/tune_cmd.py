"""`primekd tune`: Optuna search over KD hyperparameters, shareable by several workers."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from primekd.cli.app import app, console
from primekd.core import options
from primekd.core.io import dumps
from primekd.experiment.tune import TuneConfig, tune

if TYPE_CHECKING:
    from primekd.experiment.tune import TuneResult


def _tune(given: dict[str, Any], as_json: bool) -> None:
    result = tune(TuneConfig(**given), progress=True)
    if as_json:
        print(dumps(result.to_dict(), indent=2, default=str))
        return
    _print_summary(result)


app.command("tune")(options.command(TuneConfig, [
    options.extra("as_json", "--json", default=False, annotation=bool,
                  help="Print the summary as JSON on stdout (progress goes to stderr)."),
], _tune, """Search KD hyperparameters (alpha, temperature, learning rate, LoRA rank) with Optuna.

    Run the same command in several processes or machines with one --storage URL and
    --study name to search together; --trials is the study's total.
    """))


def _print_summary(result: TuneResult) -> None:
    print_ = functools.partial(console.print, soft_wrap=True, highlight=False)
    print_(
        f"study {result.study}: {result.complete} complete, {result.pruned} pruned, "
        f"{result.failed} failed ({result.wall_s:.0f} s in this worker)"
    )
    if result.best_trial is not None:
        params = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
        print_(
            f"best: trial {result.best_trial}, {result.objective} = {result.best_value:.4g}: "
            f"{params}"
        )
    for note in result.notes:
        print_(f"note: {note}")
    for name, path in result.files.items():
        print_(f"  {name}: {path}")
