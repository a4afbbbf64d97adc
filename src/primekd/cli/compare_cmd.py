"""`primekd compare` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("compare")
def compare_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd compare` is not built yet")
