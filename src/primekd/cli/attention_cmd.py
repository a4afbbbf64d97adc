"""`primekd attention` (not built yet)."""

from __future__ import annotations

from primekd.cli.app import app
from primekd.errors import PrimekdError


@app.command("attention")
def attention_command() -> None:
    """Not built yet."""
    raise PrimekdError("`primekd attention` is not built yet")
