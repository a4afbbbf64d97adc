"""Stop generation at the end of the final-answer line (`--stop-at-answer`).

Small models rarely end their turn after "The answer is 18."; they go on until the token
limit, and a truncated answer is graded by its last number unless it has a marker. Cutting
at `grading.answer_line_end` keeps the stated answer and saves the rest of the budget.

The engines apply it through `SamplingParams.cut` (`primekd.engines`): the hf engine stops
a row as soon as its answer holds a complete final-answer line (looking only after tokens
that write a newline, the only place such a line can end), the vllm engine cuts each answer
as it comes back. Both keep the tokens that write the text up to the end of that line; a
teacher's cut answer ends with EOS (`eos_after_cut`), so a student trained on it learns to
stop there. A cut answer has `finish_reason` "stop".
"""

from __future__ import annotations

from typing import Any

from primekd.core.grading import answer_line_end


def sampling_options(stop_at_answer: bool) -> dict[str, Any]:
    """The `SamplingParams` fields of `--stop-at-answer` (none when it is off)."""
    if not stop_at_answer:
        return {}
    return {"cut": answer_line_end, "cut_trigger": "\n"}

