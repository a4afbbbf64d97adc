"""`primekd teach` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("teach")
def teach_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd teach` is not built yet")
