"""Training data of a student: teacher-store rows or reference answers, tokenised.

- `build_datasets`: the student's tokenisation of the bare question (under the same prompt
  template `primekd eval` uses) + answer tokens, with the teacher's top-k aligned to each answer
  token; a held-out validation split by question.
- `KDCollator`: right-pads a batch; labels are -100 on prompt and padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from primekd.core.chat import STUDENT_CHAT_DATE, encode_prompts, render
from primekd.core.data import load_examples
from primekd.core.errors import PrimekdError
from primekd.core.models import tokenizer_fingerprint
from primekd.distill.config import DistillConfig
from primekd.distill.xtok_data import cross_tokenizer_rows
from primekd.evaluate.prompts import load_template
from primekd.teach import store
from primekd.teach.teacher import reference_tokens


@dataclass
class Item:
    """One training sequence: prompt + answer ids, and the teacher's top-k per answer token."""

    id: str
    input_ids: np.ndarray  # (L,) int64
    n_prompt: int
    topk_ids: np.ndarray | None = None  # (A, k) for the first A answer tokens
    topk_logprobs: np.ndarray | None = None  # (A, k) float32
    kd_mask: np.ndarray | None = None  # (A,) bool: tokens with a teacher (None: all A)


@dataclass
class Datasets:
    train: list[Item]
    val: list[Item]
    info: dict[str, Any]


def student_prompts(tokenizer: Any, questions: list[str], prompt: str | None) -> list[list[int]]:
    """The student's prompt ids: its chat template over eval's template around the question."""
    template = load_template(prompt)
    texts = [render(tokenizer, template.build(q), STUDENT_CHAT_DATE) for q in questions]
    return encode_prompts(tokenizer, texts)


def build_datasets(config: DistillConfig, tokenizer: Any) -> Datasets:
    if config.teacher_store:
        rows, info = _store_rows(config, tokenizer)
    else:
        rows, info = _reference_rows(config, tokenizer)
        rows.sort(key=lambda r: r["id"])  # as a store's: every student sees the same order
    ids = sorted({r["id"] for r in rows})
    if config.limit is not None:
        keep = set(ids[: config.limit])
        rows = [r for r in rows if r["id"] in keep]
        ids = sorted(keep)
    if config.val_size >= len(ids):
        raise PrimekdError(f"--val-size {config.val_size} leaves no training questions "
                           f"(there are {len(ids)})")
    held = set(random.Random(config.seed).sample(ids, config.val_size))
    prompts = student_prompts(tokenizer, [r["question"] for r in rows], config.prompt)
    train, val, truncated, skipped = [], [], 0, 0
    for row, prompt in zip(rows, prompts, strict=True):
        item, cut = _make_item(row, prompt, config.max_length)
        if item is None:
            skipped += 1
            continue
        truncated += cut
        (val if row["id"] in held else train).append(item)
    if not train:
        raise PrimekdError(f"no training sequences fit in --max-length {config.max_length}")
    info.update(train_sequences=len(train), val_sequences=len(val), val_questions=len(held),
                truncated=truncated, skipped_too_long=skipped)
    return Datasets(train, val, info)


def _make_item(row: dict[str, Any], prompt: list[int], max_length: int
               ) -> tuple[Item | None, int]:
    answer = list(row["answer_ids"])
    room = max_length - len(prompt)
    if room < 1:
        return None, 0
    cut = int(len(answer) > room)
    answer = answer[:room]
    topk_ids = topk_lp = kd_mask = None
    if row.get("topk_ids") is not None:
        n = min(len(answer), len(row["topk_ids"]))
        topk_ids, topk_lp = row["topk_ids"][:n], row["topk_logprobs"][:n]
        kd_mask = row["kd_mask"][:n] if row.get("kd_mask") is not None else None
    ids = np.asarray(prompt + answer, dtype=np.int64)
    return Item(row["id"], ids, len(prompt), topk_ids, topk_lp, kd_mask), cut


def _store_rows(config: DistillConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], dict]:
    dirs = store.store_directories(config.teacher_store)
    manifest = store.read_manifest(dirs[0])
    found = store.training_coverage(dirs, config.allow_partial)
    table = store.load_store(dirs, require_complete=False)
    if table.num_rows == 0:
        raise PrimekdError(f"teacher store {config.teacher_store} has no rows")
    same_vocab = manifest.get("tokenizer_fingerprint") == tokenizer_fingerprint(tokenizer)
    if same_vocab:
        _check_tokens_match_text(table, tokenizer, dirs[0])
    white_box = config.objective == "kd" and config.alpha < 1.0
    kept = _in_unit_order(table, _kept_rows(table, config.keep, config.teacher_store))
    if white_box and not same_vocab:
        return _cross_tokenizer_rows(config, tokenizer, manifest, table, kept, dirs, found)
    use_teacher_tokens = config.objective == "kd" and same_vocab
    eos = tokenizer.eos_token_id
    columns = {name: table.column(name).to_pylist() for name in
               ("id", "question", "response", "token_ids", "finish_reason")}
    topk_ids = topk_lp = None
    if white_box:
        topk_ids = _ragged_matrix(table.column("topk_ids"), np.int64)
        topk_lp = _ragged_matrix(table.column("topk_logprobs"), np.float32)
    rows = []
    for i in kept:
        finish = columns["finish_reason"][i]
        if use_teacher_tokens:
            answer = list(columns["token_ids"][i])
        else:  # sequence-level: the teacher's text in the student's tokens
            answer = tokenizer(columns["response"][i], add_special_tokens=False)["input_ids"]
            if finish != "length" and eos is not None:
                answer.append(eos)
        rows.append({
            "id": str(columns["id"][i]),
            "question": columns["question"][i],
            "answer_ids": answer,
            "topk_ids": topk_ids[i] if topk_ids is not None else None,
            "topk_logprobs": topk_lp[i] if topk_lp is not None else None,
        })
    info = _store_info(config, manifest, dirs, table, kept, white_box, same_vocab, found)
    info["max_token_id"] = _max_token_id(table, white_box) if use_teacher_tokens else None
    return rows, info


def _store_info(config: DistillConfig, manifest: dict[str, Any], dirs: list[Any], table: Any,
                kept: list[int], white_box: bool, same_vocab: bool, found: Any
                ) -> dict[str, Any]:
    return {"source": "teacher_store", "teacher_store": str(config.teacher_store),
            "teacher_store_parts": [str(d) for d in dirs],
            "teacher": manifest.get("teacher"), "target": manifest.get("target"),
            "top_k": manifest.get("top_k"), "store_rows": table.num_rows,
            "keep": config.keep, "kept_rows": len(kept),
            "white_box": white_box, "same_tokenizer": same_vocab,
            **found.to_dict(), "partial": not found.complete}


def _cross_tokenizer_rows(config: DistillConfig, tokenizer: Any, manifest: dict[str, Any],
                          table: Any, kept: list[int], dirs: list[Any], found: Any
                          ) -> tuple[list[dict[str, Any]], dict]:
    """A teacher of another tokenizer: answers in the student's tokens, aligned by text."""
    topk_ids = _ragged_matrix(table.column("topk_ids"), np.int64)
    topk_lp = _ragged_matrix(table.column("topk_logprobs"), np.float32)
    rows, xtok = cross_tokenizer_rows(table, kept, tokenizer, manifest, config.xtok_loss,
                                      topk_ids, topk_lp, config.teacher_store)
    info = _store_info(config, manifest, dirs, table, kept, True, False, found)
    info.update(xtok, max_token_id=None)
    return rows, info


def _in_unit_order(table: Any, rows: list[int]) -> list[int]:
    """Store rows by (id, sample): the order a teacher's parts were written in follows the
    order its answers finished, and training's data order must not."""
    ids, samples = table.column("id").to_pylist(), table.column("sample").to_pylist()
    return sorted(rows, key=lambda i: (str(ids[i]), samples[i]))


def _kept_rows(table: Any, keep: str, source: Any) -> list[int]:
    """The store rows a student trains on: all, or (`keep="correct"`, rejection sampling)
    only the answers the store graded correct."""
    if keep == "all":
        return list(range(table.num_rows))
    correct = table.column("correct").to_pylist()
    kept = [i for i, flag in enumerate(correct) if flag is True]
    if not kept:
        raise PrimekdError(f"--keep correct: no answer in teacher store {source} was graded "
                           f"correct (0 of {table.num_rows}); use --keep all, or a teacher "
                           "that solves some of its questions")
    return kept


def _max_token_id(table: Any, white_box: bool) -> int:
    """The largest token id the student will be asked to score (answer or teacher top-k)."""
    names = ["token_ids", *(["topk_ids"] if white_box else [])]
    highest = -1
    for name in names:
        values = table.column(name).combine_chunks().flatten()
        if name == "topk_ids":
            values = values.flatten()
        if len(values):
            highest = max(highest, int(pc.max(values).as_py()))
    return highest


def check_vocabulary(info: dict[str, Any], rows: int, student: str) -> None:
    """Refuse teacher token ids past the student's embedding rows (a device-side assert on
    CUDA, mid-run): tokenizers can share a fingerprint while embedding sizes differ."""
    highest = info.get("max_token_id")
    if highest is not None and highest >= rows:
        raise PrimekdError(
            f"the teacher store holds token id {highest} but the student {student} has "
            f"{rows} embedding rows (vocab_size {rows} < {highest + 1}): trim the teacher's "
            "top-k to the student's vocabulary, or pad the student's embeddings "
            f"(resize_token_embeddings to at least {highest + 1})")


def _check_tokens_match_text(table: Any, tokenizer: Any, directory: Any, sample: int = 8
                             ) -> None:
    """Equal fingerprints claim one vocabulary: check that the student's tokenizer turns a
    few rows' token ids back into their responses (an edited manifest would pass otherwise)."""
    n = min(sample, table.num_rows)
    ids = table.column("token_ids").slice(0, n).to_pylist()
    texts = table.column("response").slice(0, n).to_pylist()
    squash = "".join
    mismatched = 0
    for token_ids, text in zip(ids, texts, strict=True):
        target = squash((text or "").split())
        decoded = {squash(tokenizer.decode(token_ids, skip_special_tokens=skip).split())
                   for skip in (True, False)}
        mismatched += target not in decoded
    if mismatched * 2 > n:
        raise PrimekdError(
            f"{directory}: the manifest's tokenizer fingerprint matches the student's, but "
            f"the student's tokenizer does not decode {mismatched} of {n} sampled rows' "
            "token_ids to their responses: the store was made with another vocabulary")


def _ragged_matrix(column: Any, dtype: Any) -> list[np.ndarray]:
    """list<list<x>> (rows of (A_i, k)) -> one (A_i, k) numpy array per row, without Python."""
    array = column.combine_chunks()
    outer = array.offsets.to_numpy()
    inner = array.flatten()
    if len(inner) == 0:
        return [np.zeros((0, 1), dtype=dtype) for _ in range(len(array))]
    widths = np.diff(inner.offsets.to_numpy())
    if (widths != widths[0]).any():
        raise PrimekdError("teacher store rows have different top-k widths")
    values = inner.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    values = values.reshape(len(inner), int(widths[0]))
    start = outer[0]
    return [values[a - start:b - start] for a, b in zip(outer[:-1], outer[1:], strict=True)]


def _reference_rows(config: DistillConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], dict]:
    spec = config.data or "train"
    examples = load_examples(spec, limit=config.limit)
    rows = [{"id": e.id, "question": e.question, "answer_ids": reference_tokens(tokenizer, e)}
            for e in examples]
    # references are correct by definition: --keep correct keeps them all
    return rows, {"source": "references", "data": spec, "white_box": False,
                  "keep": config.keep, "kept_rows": len(rows)}


class KDCollator:
    """Right-pad items into input_ids, attention_mask, labels (-100 off the answer) and the
    teacher's top-k aligned with the labels (position t holds the distribution of token t)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        width = max(len(it.input_ids) for it in items)
        b = len(items)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it.input_ids)
            input_ids[row, :n] = torch.from_numpy(it.input_ids)
            attention[row, :n] = 1
            labels[row, it.n_prompt:n] = input_ids[row, it.n_prompt:n]
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if all(it.topk_ids is not None for it in items):
            batch.update(self._teacher(items, width))
        return batch

    @staticmethod
    def _teacher(items: list[Item], width: int) -> dict[str, torch.Tensor]:
        k = items[0].topk_ids.shape[1]
        ids = torch.zeros((len(items), width, k), dtype=torch.long)
        logprobs = torch.zeros((len(items), width, k), dtype=torch.float32)
        mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, it in enumerate(items):
            a = len(it.topk_ids)
            span = slice(it.n_prompt, it.n_prompt + a)
            ids[row, span] = torch.tensor(it.topk_ids)
            logprobs[row, span] = torch.tensor(it.topk_logprobs)
            mask[row, span] = True if it.kd_mask is None else torch.tensor(it.kd_mask)
        return {"topk_ids": ids, "topk_logprobs": logprobs, "kd_mask": mask}


__all__ = ["Datasets", "Item", "KDCollator", "build_datasets", "check_vocabulary",
           "student_prompts"]
