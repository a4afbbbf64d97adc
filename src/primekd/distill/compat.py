"""Whether a teacher can score the student's tokens on-policy.

On-policy distillation with a teacher of the student's tokenizer hands the student's answer
token ids to the teacher and trains on the teacher's top-k ids at every position, so every id
the teacher can name must be a row of the student's output layer (an id past it is a
device-side assert on CUDA, mid-run): `check_teacher_compat` refuses a pair that breaks this,
in one line, before any rollout. A teacher of another tokenizer reads the rollouts' text in
its own tokens instead, and its scores are aligned back by characters (cross-tokenizer KD,
`distill.xtok_data`), so its vocabulary size does not matter.
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


def same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    return tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(student_tokenizer)


def check_teacher_compat(student: str, teacher: str, student_rows: int, teacher_rows: int
                         ) -> None:
    """Refuse a teacher of the student's tokenizer whose output layer has rows (ids its
    top-k may name) the student lacks."""
    if teacher_rows > student_rows:
        raise PrimekdError(
            f"--teacher {teacher} has {teacher_rows} vocabulary rows, the student {student} "
            f"{student_rows}: the teacher's top-k may name ids the student has no row for; "
            "use a teacher whose vocab_size is at most the student's")
