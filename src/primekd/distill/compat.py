"""Whether a teacher can score the student's tokens on-policy.

On-policy distillation hands the student's answer token ids to the teacher and trains on the
teacher's top-k ids at every position, so both must read ids alike (one vocabulary) and
every id the teacher can name must be a row of the student's output layer (an id past it is
a device-side assert on CUDA, mid-run). `check_teacher_compat` refuses a pair that breaks
either, in one line, before any rollout. Cross-tokenizer distillation plugs in here: a
teacher with another vocabulary is then mapped instead of refused.
"""

from __future__ import annotations

from typing import Any

from primekd.core.errors import PrimekdError
from primekd.core.models import tokenizer_fingerprint


def vocabulary_rows(source: Any) -> int:
    """A model's output-layer rows (its config's vocab_size), no weights loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def check_teacher_compat(student: str, teacher: str, student_tokenizer: Any,
                         teacher_tokenizer: Any, student_rows: int, teacher_rows: int) -> None:
    """Refuse a teacher whose vocabulary differs from the student's, or whose output layer
    has rows (ids its top-k may name) the student lacks."""
    if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(student_tokenizer):
        raise PrimekdError(
            f"--teacher {teacher} has another tokenizer than the student {student}: it would "
            "score the student's token ids as its own tokens; on-policy distillation needs "
            "one vocabulary (a teacher of the student's model family)")
    if teacher_rows > student_rows:
        raise PrimekdError(
            f"--teacher {teacher} has {teacher_rows} vocabulary rows, the student {student} "
            f"{student_rows}: the teacher's top-k may name ids the student has no row for; "
            "use a teacher whose vocab_size is at most the student's")
