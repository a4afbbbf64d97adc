"""Stop generation at the end of the final-answer line (`--stop-at-answer`).

Small models rarely end their turn after "The answer is 18."; they go on until the token
limit, and a truncated answer is graded by its last number unless it has a marker. Cutting
at `grading.answer_line_end` keeps the stated answer and saves the rest of the budget.

Generation code uses two pieces: `stopping_criteria` (for `model.generate`, so a row stops
early) and `answer_prefix` (how many generated tokens to keep). Both work on token ids only,
so any engine can use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from primekd.grading import answer_line_end


def answer_prefix(tokenizer: Any, ids: Sequence[int]) -> int | None:
    """The number of tokens of the shortest prefix of `ids` whose text holds a complete
    final-answer line, or None when the text has none."""
    ids = list(ids)
    if not ids or answer_line_end(tokenizer.decode(ids, skip_special_tokens=True)) is None:
        return None
    lo, hi = 1, len(ids)
    while lo < hi:  # the predicate is monotone: a complete line stays complete
        mid = (lo + hi) // 2
        if answer_line_end(tokenizer.decode(ids[:mid], skip_special_tokens=True)) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def cut_text(text: str) -> str:
    """`text` up to the end of its final-answer line (unchanged when it has none)."""
    end = answer_line_end(text)
    return text if end is None else text[:end]


def stopping_criteria(tokenizer: Any, prompt_width: int) -> Any:
    """A `StoppingCriteriaList` for `model.generate` that ends each row once its answer
    (the columns after `prompt_width`) holds a complete final-answer line."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AnswerLineStop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for row, ids in enumerate(input_ids[:, prompt_width:].tolist()):
                # A line ends only with a newline: decode the whole row only when one came.
                if ids and "\n" in tokenizer.decode(ids[-1:], skip_special_tokens=True):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    done[row] = answer_line_end(text) is not None
            return done

    return StoppingCriteriaList([AnswerLineStop()])


def cut_generation(tokenizer: Any, generation: Any, end_id: int | None = None) -> Any:
    """A generation (a dataclass with `token_ids`, `finish_reason`, and maybe `text` and
    `n_tokens`) cut after its final-answer line; `end_id` (an EOS token) is appended to the
    kept tokens, so a student trained on them learns to stop there. Unchanged without one."""
    from dataclasses import fields, replace

    n = answer_prefix(tokenizer, generation.token_ids)
    if n is None:
        return generation
    ids = list(generation.token_ids[:n])
    changes: dict[str, Any] = {"token_ids": ids + ([end_id] if end_id is not None else []),
                               "finish_reason": "stop"}
    names = {f.name for f in fields(generation)}
    if "text" in names:
        changes["text"] = cut_text(tokenizer.decode(ids, skip_special_tokens=True))
    if "n_tokens" in names:
        changes["n_tokens"] = len(changes["token_ids"])
    return replace(generation, **changes)
