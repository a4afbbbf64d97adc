"""Cross-tokenizer alignment: which student tokens and teacher tokens cover the same text.

Both sides tokenise the same answer text; each token is described by its end offset in it
(`primekd.teach.spans`). A boundary both sides share (a character offset where a teacher
token and a student token both end) cuts the text; the runs of tokens between two shared
boundaries form one *group*. A group of one teacher and one student token is a 1:1 match
(the same characters); otherwise the group merges the smallest runs both sides cover.
Tokens with empty spans (pieces of a split character, special tokens) join the group of the
character they precede; empty tokens after the text (EOS on both sides) form a last group.

The loss compares, per group, the teacher's distribution for its *first* token with the
student's distribution for its first token: both are predictions made after exactly the same
text (the group's start), so the two conditionings agree even where the tokens differ. The
other tokens of a merged group get the student's cross-entropy only.

`vocabulary_map` maps teacher token ids to student ids whose decoded strings are identical
(computed once per tokenizer pair, cached on disk under both fingerprints).
"""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from primekd.core.models import cache_dir, tokenizer_fingerprint


@dataclass(frozen=True)
class Group:
    """Teacher tokens [t_start, t_stop) and student tokens [s_start, s_stop) over `chars`
    characters of the answer text."""

    t_start: int
    t_stop: int
    s_start: int
    s_stop: int
    chars: int

    @property
    def one_to_one(self) -> bool:
        return self.t_stop - self.t_start == 1 and self.s_stop - self.s_start == 1


def _widths(ends: Sequence[int]) -> list[int]:
    return [e - (ends[i - 1] if i else 0) for i, e in enumerate(ends)]


def _group_index(ends: Sequence[int], common: Sequence[int], text_end: int) -> list[int]:
    """For each token, the index of its group: the first shared boundary at or after its end
    (after its position, for an empty token); len(common) for empty tokens after the text,
    and len(common) + 1 for tokens past the last shared boundary (unaligned)."""
    index = []
    for end, width in zip(ends, _widths(ends), strict=True):
        if width > 0:
            g = bisect.bisect_left(common, end)
        elif end >= text_end:
            g = len(common)
        else:
            g = bisect.bisect_right(common, end)
        index.append(g if g <= len(common) else len(common) + 1)
    return index


def align(teacher_ends: Sequence[int], student_ends: Sequence[int], text_length: int
          ) -> list[Group]:
    """The aligned groups of two tokenisations of one text of `text_length` characters."""
    cuts = {e for e, w in zip(teacher_ends, _widths(teacher_ends), strict=True) if w > 0}
    cuts &= {e for e, w in zip(student_ends, _widths(student_ends), strict=True) if w > 0}
    common = sorted(c for c in cuts if c <= text_length)
    t_index = _group_index(teacher_ends, common, text_length)
    s_index = _group_index(student_ends, common, text_length)
    groups = []
    for g in range(len(common) + 1):
        t = _run(t_index, g)
        s = _run(s_index, g)
        if t is None or s is None:
            continue
        chars = common[g] - (common[g - 1] if g else 0) if g < len(common) else 0
        groups.append(Group(t[0], t[1], s[0], s[1], chars))
    return groups


def _run(index: list[int], g: int) -> tuple[int, int] | None:
    """[start, stop) of the tokens in group g (indices are non-decreasing), or None."""
    start = bisect.bisect_left(index, g)
    stop = bisect.bisect_right(index, g)
    return (start, stop) if stop > start else None


# ---------------------------------------------------------------- vocabulary mapping


def _token_strings(tokenizer: Any) -> list[str | None]:
    """Each id's decoded string; None where it decodes to nothing or to part of a character."""
    size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [t if t and "\ufffd" not in t else None for t in texts]


def build_vocabulary_map(teacher_tokenizer: Any, student_tokenizer: Any) -> np.ndarray:
    """(teacher vocabulary,) int32: the student id with the identical decoded string, or -1.
    Among student ids sharing a string the lowest wins; the EOS tokens map to each other."""
    student: dict[str, int] = {}
    for i, text in enumerate(_token_strings(student_tokenizer)):
        if text is not None:
            student.setdefault(text, i)
    teacher = _token_strings(teacher_tokenizer)
    mapping = np.array([student.get(t, -1) if t is not None else -1 for t in teacher],
                       dtype=np.int32)
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if t_eos is not None and s_eos is not None:
        mapping[t_eos] = s_eos
    return mapping


def vocabulary_map(teacher_tokenizer: Any, student_tokenizer: Any,
                   cache: Path | None = None) -> np.ndarray:
    """`build_vocabulary_map`, cached as vocab-maps/<teacher fp>-<student fp>.npy."""
    folder = cache if cache is not None else cache_dir() / "vocab-maps"
    name = f"{tokenizer_fingerprint(teacher_tokenizer)}-{tokenizer_fingerprint(student_tokenizer)}"
    path = folder / f"{name}.npy"
    if path.exists():
        return np.load(path)
    mapping = build_vocabulary_map(teacher_tokenizer, student_tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, mapping)
    os.replace(tmp, path)
    return mapping


def map_topk(topk_ids: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(n, k) teacher ids -> student ids, -1 where unmapped. A student id that two teacher
    ids map to keeps only the first (most likely) of them: the student's probability of one
    token must not be counted twice."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(mapping))
    mapped = np.where(inside, mapping[np.clip(ids, 0, len(mapping) - 1)], -1).astype(np.int64)
    k = mapped.shape[-1]
    earlier = np.tril(np.ones((k, k), dtype=bool), -1)  # [j, i]: slot i comes before slot j
    repeated = ((mapped[:, :, None] == mapped[:, None, :]) & earlier).any(-1) & (mapped >= 0)
    mapped[repeated] = -1
    return mapped


__all__ = ["Group", "align", "build_vocabulary_map", "map_topk", "vocabulary_map"]
