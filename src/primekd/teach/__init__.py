"""Teaching: priming strategies (`priming`), the teacher pass (`teacher`), the store (`store`).

`primekd.teach.teach(TeachConfig(...))` loads the teacher on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TeachConfig", "teach"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from primekd.teach import teacher

        return getattr(teacher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
