"""`primekd tune`: Optuna search over KD hyperparameters, shareable by several workers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from primekd.cli.app import app, console
from primekd.core.io import dumps

if TYPE_CHECKING:
    from primekd.experiment.tune import TuneResult


@app.command("tune")
def tune_command(
    teacher_store: Path = typer.Option(
        ..., "--teacher-store", help="Teacher store directory written by `primekd teach`."
    ),
    student: str = typer.Option(
        ...,
        "--student",
        help="Student model: the bundled alias smollm2-135m-instruct, a local HF directory, "
        "a .gguf file or a hub id.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Output directory: trials/<number>/, best_params.yaml (for distill --config), "
        "best_run.yaml (for primekd run), trials.csv, summary.json, history.png, "
        "importance.png (and study.db with the default storage).",
    ),
    space: Path | None = typer.Option(
        None,
        "--space",
        help="Search space YAML (DistillConfig field -> {low, high[, log, step, type]} or "
        "{choices: [...]}, or a plain value to fix it). Default: alpha in [0, 1], temperature "
        "in [1, 10] (log), lr in [1e-5, 1e-3] (log), lora_r in {4, 8, 16}.",
    ),
    objective: str = typer.Option(
        "val_loss",
        "--objective",
        help="What a trial is scored on, always on the held-out validation slice of the store: "
        "val_loss (the student's cross-entropy on the held-out teacher answers, minimised, "
        "cheap) or val_accuracy (GSM8K accuracy of its generated answers, maximised).",
    ),
    val_size: int = typer.Option(
        16, "--val-size", help="Store questions held out of training as the validation slice."
    ),
    trials: int = typer.Option(
        10,
        "--trials",
        help="Finished trials (complete or pruned) the study should hold in total, counted "
        "over all workers sharing it.",
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds after which this worker starts no new trial."
    ),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="Optuna RDB URL shared by workers, e.g. postgresql://user:pass@host/db. "
        "Default: sqlite:///OUT/study.db.",
    ),
    study: str = typer.Option(
        "primekd-tune", "--study", help="Study name inside the storage (workers join by name)."
    ),
    sampler: str = typer.Option(
        "tpe", "--sampler", help="tpe (Bayesian optimisation after random start-up) or random."
    ),
    pruner: str = typer.Option(
        "median",
        "--pruner",
        help="median (stop a trial whose validation loss is worse than the median of earlier "
        "trials at the same step) or none.",
    ),
    max_steps: int = typer.Option(
        30, "--max-steps", help="Optimiser steps per trial (a reduced budget)."
    ),
    eval_steps: int | None = typer.Option(
        None,
        "--eval-steps",
        help="Validation loss every N steps, reported to the pruner. Default: max-steps / 4.",
    ),
    max_new_tokens: int = typer.Option(
        256, "--max-new-tokens", help="Answer length limit of the val_accuracy objective."
    ),
    heartbeat: int = typer.Option(
        10,
        "--heartbeat",
        help="Seconds between worker heartbeats; a trial silent for 3x this is marked failed "
        "and its parameters retried.",
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        help="Seed of the sampler, of every trial's training and of the validation slice.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary as JSON on stdout (progress goes to stderr)."
    ),
) -> None:
    """Search KD hyperparameters (alpha, temperature, learning rate, LoRA rank) with Optuna.

    Run the same command in several processes or machines with one --storage URL and
    --study name to search together; --trials is the study's total.
    """
    from primekd.experiment.tune import TuneConfig, default_search_space, load_search_space, tune

    config = TuneConfig(
        teacher_store=str(teacher_store),
        student=student,
        out=str(out),
        space=load_search_space(space) if space else default_search_space(),
        objective=objective,
        val_size=val_size,
        trials=trials,
        timeout=timeout,
        storage=storage,
        study=study,
        sampler=sampler,
        pruner=pruner,
        max_steps=max_steps,
        eval_steps=eval_steps,
        seed=seed,
        heartbeat=heartbeat,
        max_new_tokens=max_new_tokens,
    )
    result = tune(config, progress=True)
    if as_json:
        print(dumps(result.to_dict(), indent=2, default=str))
        return
    _print_summary(result)


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
