"""Batched generation over chat prompts: left padding, attention masks, stop at EOS.

Every stage that asks a model for answers (evaluation, the teacher) goes through
`generate`, so they agree on how a prompt is rendered, where an answer stops and what
counts as a generated token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from primekd import answer_stop
from primekd.chat import ChatPrompt, encode_prompts, left_pad, render
from primekd.errors import PrimekdError

# Batches sorted by prompt length are formed within windows of this many batches, so
# similar lengths share a batch (less padding) while results still arrive in order.
SORT_WINDOW_BATCHES = 8


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0  # seeds sampling; unused when greedy
    stop: tuple[str, ...] = ()  # strings that end an answer too (cut from the text)
    stop_at_answer: bool = False  # end at the final-answer line (see primekd.answer_stop)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise PrimekdError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise PrimekdError("--temperature must not be negative (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise PrimekdError("--top-p must be in (0, 1]")


@dataclass(frozen=True)
class Generation:
    text: str  # the answer only, special tokens removed
    token_ids: list[int]  # generated tokens, including the stop token when there is one
    n_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_new_tokens)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Tokens that end a reply: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise PrimekdError("the model defines no end-of-sequence token; cannot tell when to stop")
    return sorted(ids)


def generate_batch(
    model: Any, tokenizer: Any, prompts: Sequence[ChatPrompt], params: SamplingParams
) -> list[Generation]:
    """Generate for prompts in one left-padded batch (all prompts share one forward pass)."""
    return _generate_encoded(model, tokenizer, _encode(tokenizer, prompts), params)


def _encode(tokenizer: Any, prompts: Sequence[ChatPrompt]) -> list[list[int]]:
    return encode_prompts(tokenizer, [render(tokenizer, p) for p in prompts])


def _generate_encoded(
    model: Any, tokenizer: Any, encoded: list[list[int]], params: SamplingParams
) -> list[Generation]:
    import torch

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    batch = {k: v.to(model.device) for k, v in left_pad(encoded, pad_id).items()}
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": False}
    if params.temperature > 0:
        torch.manual_seed(params.seed)
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
    if params.stop:
        kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)
    if params.stop_at_answer:
        kwargs["stopping_criteria"] = answer_stop.stopping_criteria(
            tokenizer, batch["input_ids"].shape[1])
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs, eos_token_id=stops, pad_token_id=pad_id)
    new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
    finished = [_finish(tokenizer, row, set(stops), params.stop) for row in new_tokens]
    if params.stop_at_answer:  # the one hook of --stop-at-answer
        finished = [answer_stop.cut_generation(tokenizer, g) for g in finished]
    return finished


def _finish(tokenizer: Any, row: list[int], stops: set[int], stop_strings: tuple[str, ...]
            ) -> Generation:
    """Cut a generated row at its first stop token or stop string and decode the answer."""
    end = next((i for i, token in enumerate(row) if token in stops), None)
    answer = row if end is None else row[:end]
    text = tokenizer.decode(answer, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=None)
    if cut is not None:  # tokens after the stop string are padding, not answer
        n = _tokens_until_stop(tokenizer, answer, stop_strings)
        return Generation(text[:cut], answer[:n], n, "stop")
    token_ids = row if end is None else row[: end + 1]
    return Generation(text, token_ids, len(token_ids), "length" if end is None else "stop")


def _tokens_until_stop(tokenizer: Any, ids: list[int], stop_strings: tuple[str, ...]) -> int:
    """The shortest prefix of `ids` whose text holds a stop string (binary search)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        text = tokenizer.decode(ids[:mid], skip_special_tokens=True)
        if any(s in text for s in stop_strings):
            hi = mid
        else:
            lo = mid + 1
    return lo


def iter_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[ChatPrompt],
    params: SamplingParams,
    batch_size: int = 16,
) -> Iterator[list[tuple[int, Generation]]]:
    """Yield each finished batch as (index into `prompts`, generation) pairs.

    Within a window of a few batches, prompts are sorted by length so that a batch holds
    prompts of similar length; callers that save batch by batch lose at most one batch.
    """
    if batch_size < 1:
        raise PrimekdError("--batch-size must be at least 1")
    params.validate()
    encoded = _encode(tokenizer, prompts)
    window = batch_size * SORT_WINDOW_BATCHES
    for start in range(0, len(prompts), window):
        end = min(start + window, len(prompts))
        order = sorted(range(start, end), key=lambda i: len(encoded[i]))
        for b in range(0, len(order), batch_size):
            indices = order[b: b + batch_size]
            # A distinct seed per batch, so sampled batches do not repeat each other.
            batch_params = _reseed(params, indices[0])
            generations = _generate_encoded(model, tokenizer, [encoded[i] for i in indices],
                                            batch_params)
            yield list(zip(indices, generations, strict=True))


def _reseed(params: SamplingParams, offset: int) -> SamplingParams:
    if params.temperature == 0:
        return params
    return replace(params, seed=params.seed + offset)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[ChatPrompt],
    params: SamplingParams | None = None,
    batch_size: int = 16,
    on_batch: Callable[[list[tuple[int, Generation]]], None] | None = None,
) -> list[Generation]:
    """Generate an answer for every prompt; results come back in the order of `prompts`."""
    results: list[Generation | None] = [None] * len(prompts)
    for pairs in iter_generate(model, tokenizer, prompts, params or SamplingParams(), batch_size):
        for index, generation in pairs:
            results[index] = generation
        if on_batch is not None:
            on_batch(pairs)
    return [g for g in results if g is not None]
