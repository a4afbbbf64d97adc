"""Command-line interface: a thin layer over the library, one module per command."""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from primekd.cli.app import app, err_console, state
from primekd.core import diskspace
from primekd.core.errors import PrimekdError

# Each import registers its command on `app`.
from primekd.cli import (  # noqa: E402,F401  isort: skip
    eval_cmd,
    grade_cmd,
    compare_cmd,
    teach_cmd,
    distill_cmd,
    attention_cmd,
    tune_cmd,
    run_cmd,
    models_cmd,
)


_INTERRUPTED = "interrupted: finished work is saved; rerun the same command to resume"


def main() -> None:
    # torch's OpenMP threads spin while they wait: beside one busy process on 2 cores that
    # made LoRA training 7x slower and scoring 1.4x (bench/stage_levers.py). Set before a
    # command imports torch; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except PrimekdError as e:
        if state.debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print(_INTERRUPTED, highlight=False)
        sys.exit(130)
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C into a silent exit 130
            err_console.print(_INTERRUPTED, highlight=False)
        raise
    except Exception as e:  # noqa: BLE001 - unexpected failures still get one line
        if state.debug:
            raise
        if diskspace.is_full(e):  # a write outside any stage's guard
            err_console.print(f"[bold red]error:[/] {escape(diskspace.message(e))}",
                              highlight=False, soft_wrap=True)
            sys.exit(2)
        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
