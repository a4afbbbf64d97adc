"""Evaluation: the student prompt (`prompts`), stopping at the answer line (`answer_stop`),
and generating + grading answers (`evaluator`). Teach and distill reuse the first two.

`primekd.evaluate.evaluate(EvalConfig(...))` loads the evaluator on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalConfig", "evaluate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from primekd.evaluate import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
