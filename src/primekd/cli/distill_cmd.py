"""`primekd distill`: train a student adapter from a teacher store (KD) or references (SFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from primekd.cli.app import app, console
from primekd.core import options
from primekd.core.io import dumps
from primekd.core.outdir import check_out
from primekd.distill import distill
from primekd.distill.config import (
    DistillConfig,
    check_config,
    config_from_dict,
    load_distill_config,
)


def _distill(given: dict[str, Any], config_file: Path | None, as_json: bool, quiet: bool
             ) -> None:
    if given.get("on_policy") and "alpha" not in given and config_file is None:
        given["alpha"] = 0.0  # on-policy: the divergence alone (CE on own samples self-trains)
    config = (load_distill_config(config_file, **given) if config_file
              else config_from_dict(given, source="options"))

    check_config(config)  # before the seconds it takes to import torch and transformers
    check_out(config.out, "distill", config.force)

    result = distill(config, progress=not quiet)
    _leave_process_group()
    if as_json:
        print(dumps(result.summary, indent=2, default=str))
        return
    _print_summary(result.summary)


app.command("distill")(options.command(DistillConfig, [
    options.extra("config_file", "--config", annotation=Path,
                  help="YAML file whose keys are option names (snake_case, e.g. lora_r); "
                  "options given here override it."),
    options.extra("as_json", "--json", default=False, annotation=bool,
                  help="Print the summary as JSON."),
    options.extra("quiet", "--quiet", "-q", default=False, annotation=bool,
                  help="No progress bar."),
], _distill, """Train a student (LoRA by default) from a teacher store or GSM8K references.

    Loss: alpha * CE(answer tokens) + (1 - alpha) * T^2 * D(teacher || student), with the
    teacher's top-k distribution plus a rest bucket. Run data-parallel with
    `accelerate launch --multi_gpu --num_processes N $(which primekd) distill ...`.
    """))


def _leave_process_group() -> None:
    """Under `accelerate launch`, destroy the process group before the interpreter exits:
    left to exit-time teardown, gloo's worker threads can abort the process ("terminate
    called without an active exception", SIGABRT) after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _kept(data: dict[str, Any]) -> str | None:
    if data.get("keep") != "correct":
        return None
    return f"{data.get('kept_rows')}/{data.get('store_rows')} (graded correct)"


def _partial(data: dict[str, Any]) -> str | None:
    """--allow-partial on a store short of answers: how many of those planned it held."""
    if not data.get("partial"):
        return None
    return (f"{data.get('answered_rows')} of {data.get('planned_rows')} planned answers "
            "(--allow-partial)")


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"distilled into {summary['out']}", show_header=False)
    rows = [
        ("steps", summary["steps"]),
        ("final train loss", summary["final_train_loss"]),
        ("val loss before", summary["val_loss_before"]),
        ("val loss after", summary["val_loss_after"]),
        ("tokens", summary["tokens"]),
        ("answers kept", _kept(summary.get("data", {}))),
        ("PARTIAL store", _partial(summary.get("data", {}))),
        ("tokens/s", summary["tokens_per_s"]),
        ("trainable params", summary["trainable_params"]),
        ("wall time (s)", summary["wall_time_s"]),
    ]
    for name, value in rows:
        if value is not None:
            table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
