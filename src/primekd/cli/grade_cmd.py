"""`primekd grade` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("grade")
def grade_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd grade` is not built yet")
