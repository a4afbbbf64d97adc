"""Training rows for a student whose tokenizer differs from the teacher store's.

The student's answer is the store's `answer_text` in the student's tokens (plus EOS where the
teacher finished); `align.align` groups the two tokenisations by character spans, and each
group's first student token carries the teacher's top-k of the group's first teacher token
(see `primekd.distill.align` for why the first). For the ``mapped`` loss the teacher ids are
translated to student ids (-1 where no student token has the same string).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from primekd.core.errors import PrimekdError
from primekd.core.models import load_tokenizer, tokenizer_fingerprint
from primekd.distill.align import align, map_topk, vocabulary_map
from primekd.teach.spans import encode_answer

_COLUMNS = ("id", "question", "finish_reason", "answer_text", "token_char_ends")


def cross_tokenizer_rows(table: Any, kept: list[int], tokenizer: Any, manifest: dict[str, Any],
                         loss: str, topk_ids: list[np.ndarray], topk_lp: list[np.ndarray],
                         source: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One training row per kept store row, with `kd_mask` and the aligned teacher top-k."""
    columns = {name: table.column(name).to_pylist() for name in _COLUMNS}
    if any(columns["token_char_ends"][i] is None for i in kept):
        raise PrimekdError(
            f"teacher store {source} has no character spans (written by a primekd before "
            "cross-tokenizer KD): rebuild it with the same `primekd teach` command into a new "
            "--out (a --target reference store only re-scores the references, minutes), or "
            "train on its text with --objective sft")
    mapping = _mapping(manifest, tokenizer, source) if loss == "mapped" else None
    rows, counts = [], np.zeros(5)  # chars: total, 1:1, merged; mass: mapped, top-k
    for i in kept:
        text, t_ends = columns["answer_text"][i], columns["token_char_ends"][i]
        ids, s_ends = encode_answer(tokenizer, text, columns["finish_reason"][i] != "length")
        groups = align(t_ends, s_ends, len(text))
        starts = np.array([g.s_start for g in groups], dtype=np.int64)
        sources = np.array([g.t_start for g in groups], dtype=np.int64)
        k = topk_ids[i].shape[1]
        kd_mask = np.zeros(len(ids), dtype=bool)
        kd_mask[starts] = True
        lp = np.zeros((len(ids), k), dtype=np.float32)
        lp[starts] = topk_lp[i][sources]
        mapped = np.full((len(ids), k), -1, dtype=np.int64)
        if mapping is not None:
            mapped[starts] = map_topk(topk_ids[i][sources], mapping)
            probs = np.exp(lp[starts].astype(np.float64))
            counts[3] += (probs * (mapped[starts] >= 0)).sum()
            counts[4] += probs.sum()
        counts[0] += len(text)
        counts[1] += sum(g.chars for g in groups if g.one_to_one)
        counts[2] += sum(g.chars for g in groups if not g.one_to_one)
        rows.append({"id": str(columns["id"][i]), "question": columns["question"][i],
                     "answer_ids": ids, "topk_ids": mapped, "topk_logprobs": lp,
                     "kd_mask": kd_mask})
    return rows, _info(counts, loss)


def _info(counts: np.ndarray, loss: str) -> dict[str, Any]:
    total = max(counts[0], 1.0)
    info = {"xtok_loss": loss, "answer_chars": int(counts[0]),
            "chars_one_to_one": counts[1] / total, "chars_merged": counts[2] / total,
            "chars_unaligned": 1.0 - (counts[1] + counts[2]) / total}
    if loss == "mapped":
        info["teacher_mass_mapped"] = counts[3] / counts[4] if counts[4] else None
    return {"cross_tokenizer": info}


def _mapping(manifest: dict[str, Any], tokenizer: Any, source: Any) -> np.ndarray:
    """The teacher->student vocabulary map; the teacher's tokenizer comes from the model the
    manifest names (its fingerprint must be the store's)."""
    teacher = manifest.get("teacher")
    try:
        teacher_tokenizer = load_tokenizer(teacher)
    except PrimekdError as e:
        raise PrimekdError(f"--xtok-loss mapped needs the tokenizer of the teacher of {source} "
                           f"({teacher}): {e}; or use --xtok-loss uld, which needs none"
                           ) from None
    if tokenizer_fingerprint(teacher_tokenizer) != manifest.get("tokenizer_fingerprint"):
        raise PrimekdError(f"the tokenizer of {teacher} is not the one {source} was written "
                           "with (fingerprints differ); use --xtok-loss uld")
    return vocabulary_map(teacher_tokenizer, tokenizer)


__all__ = ["cross_tokenizer_rows"]
