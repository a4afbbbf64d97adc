"""`primekd tune` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("tune")
def tune_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd tune` is not built yet")
