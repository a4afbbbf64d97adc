"""`primekd eval` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("eval")
def eval_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd eval` is not built yet")
