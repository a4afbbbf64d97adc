"""The values both engines exchange: sampling parameters, answers, top-k log-probs, and how
an answer's raw tokens become its text (`finish`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from primekd.core.errors import PrimekdError

# A per-request post-processing hook: given an answer's text, the character offset where the
# answer ends (text from there on is dropped, with the tokens that wrote it), or None.
Cut = Callable[[str], int | None]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0  # seeds sampling; unused when greedy
    stop: tuple[str, ...] = ()  # strings that end an answer too (cut from the text)
    logprobs: int = 0  # k > 0: the top-k log-probs (T=1, full vocabulary) of every answer token
    # A per-answer cut, e.g. `grading.answer_line_end` (stop at the final-answer line): the
    # hf engine also stops a row as soon as it applies; the vllm engine cuts after
    # generation. Deterministic, and not part of the run identity: name it there yourself.
    cut: Cut | None = field(default=None, compare=False, repr=False)
    # hf engine: look for the cut only after a token whose text holds this (None: every
    # token), e.g. "\n" for a cut that ends lines: fewer decodes per step
    cut_trigger: str | None = field(default=None, compare=False, repr=False)
    eos_after_cut: bool = False  # teachers: end a cut answer with EOS (its log-probs too)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise PrimekdError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise PrimekdError("--temperature must not be negative (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise PrimekdError("--top-p must be in (0, 1]")
        if self.logprobs < 0:
            raise PrimekdError("--top-k must not be negative")

    def as_dict(self) -> dict[str, Any]:
        """The parameters that decide the answers (for summaries and identities)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "stop": list(self.stop)}


@dataclass(frozen=True)
class TopK:
    ids: np.ndarray  # [answer tokens, k] int32, most likely first
    logprobs: np.ndarray  # [answer tokens, k] float32, full-vocabulary log-softmax at T=1


@dataclass(frozen=True)
class Generation:
    text: str  # the answer only, special tokens removed, cut at a stop string
    token_ids: list[int]  # answer tokens, including the stop token when there is one
    finish_reason: str  # "stop" (end of turn, stop string or cut) or "length"
    topk: TopK | None = None  # with SamplingParams.logprobs: one row per token in token_ids

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def cut_text(text: str, stop: Sequence[str], cut: Cut | None) -> int | None:
    """Where an answer's text ends: the first stop string, or the `cut` hook's offset."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cut is not None:
        end = cut(text)
        if end is not None and 0 <= end <= len(text):  # past the end: not there yet
            ends.append(end)
    return min(ends) if ends else None


def finish(tokenizer: Any, token_ids: list[int], reason: str, sampling: SamplingParams,
           stop_ids: set[int], topk: TopK | None = None) -> Generation:
    """One answer from its raw tokens: cut at the first stop token, then at a stop string or
    the `cut` hook (keeping the tokens up to the one that completes the kept text; with
    `eos_after_cut`, plus the EOS token, whose distribution is the one at that position)."""
    end = next((i for i, t in enumerate(token_ids) if t in stop_ids), None)
    if end is not None:
        token_ids, reason = token_ids[: end + 1], "stop"
    body = token_ids[:-1] if end is not None else token_ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    at = cut_text(text, sampling.stop, sampling.cut)
    if at is not None:
        n = _tokens_covering(tokenizer, body, text, at, sampling.stop)
        token_ids, text, reason = body[:n], text[:at], "stop"
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stop_ids)
        if sampling.eos_after_cut and (topk is None or len(topk.ids) > n):
            token_ids = [*token_ids, eos]
    if topk is not None:
        topk = TopK(topk.ids[: len(token_ids)], topk.logprobs[: len(token_ids)])
    return Generation(text, list(token_ids), reason, topk)


def _tokens_covering(tokenizer: Any, ids: list[int], text: str, at: int,
                     stop: Sequence[str]) -> int:
    """The fewest tokens (binary search) whose text holds the stop string found at `at`, or,
    for a `cut`, that write the kept text `text[:at]`."""
    here = [s for s in stop if text.startswith(s, at)]
    if not here and at == 0:
        return 0

    def reached(n: int) -> bool:
        prefix = tokenizer.decode(ids[:n], skip_special_tokens=True)
        return any(s in prefix for s in here) if here else len(prefix) >= at

    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
