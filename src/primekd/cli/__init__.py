"""Command-line interface: a thin layer over the library, one module per command."""

from __future__ import annotations

import sys

from primekd.cli.app import app, err_console, state
from primekd.errors import PrimekdError

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
)


def main() -> None:
    try:
        app()
    except PrimekdError as e:
        if state.debug:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted: finished work is saved; rerun the same command to resume")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - unexpected failures still get one line
        if state.debug:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {e} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
