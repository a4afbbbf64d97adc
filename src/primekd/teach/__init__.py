"""Teaching: priming strategies (`priming`), the teacher pass (`teacher`), the store (`store`).

`primekd.teach.teach(TeachConfig(...))` runs the teacher pass.
"""

from __future__ import annotations

from primekd.teach.teacher import TeachConfig, teach

__all__ = ["TeachConfig", "teach"]
