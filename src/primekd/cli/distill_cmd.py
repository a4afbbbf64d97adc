"""`primekd distill` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("distill")
def distill_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd distill` is not built yet")
