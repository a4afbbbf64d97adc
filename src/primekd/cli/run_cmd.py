"""`primekd run` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("run")
def run_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd run` is not built yet")
