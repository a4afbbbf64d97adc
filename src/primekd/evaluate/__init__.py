"""Evaluation: the student prompt (`prompts`), stopping at the answer line (`answer_stop`),
and generating + grading answers (`evaluator`). Teach and distill reuse the first two.

`primekd.evaluate.evaluate(EvalConfig(...))` runs an evaluation.
"""

from __future__ import annotations

from primekd.evaluate.evaluator import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
