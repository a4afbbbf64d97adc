"""The transformers engine: left-padded static batches in this process (CPU or GPU).

Generation sorts prompts by length within windows of a few batches (less padding) and yields
each finished batch. Top-k log-probs come from one teacher-forced pass over prompt + answer
(`score`), the one place the teacher's distributions come from, for generated answers and
reference solutions alike. Layout of a scoring batch: prompts left-padded to width P,
answers right-padded to width A:

    [pad pad p0 p1 ... p_{P-1} | a0 a1 ... a_{n-1} pad pad]

The logit at column c predicts the token at column c + 1, so the distribution for answer
token t is read at column P - 1 + t: the last A + 1 columns hold every answer position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from primekd.core import models
from primekd.core.chat import left_pad
from primekd.core.errors import PrimekdError
from primekd.engines.base import Generation, SamplingParams, TopK, finish

# Batches sorted by prompt length are formed within windows of this many batches.
SORT_WINDOW_BATCHES = 8
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 16, 64


class HFEngine:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else self.stop_ids[0]
        if batch_size is None:
            batch_size = GPU_BATCH_SIZE if self.device.type == "cuda" else CPU_BATCH_SIZE
        self.batch_size = batch_size
        if self.batch_size < 1:
            raise PrimekdError("--batch-size must be at least 1")

    @classmethod
    def load(cls, model: str, adapter: str | None = None, device: str | None = None,
             batch_size: int | None = None, device_map: Any = None, max_memory: Any = None
             ) -> HFEngine:
        """`device_map`/`max_memory`: spread the model over devices (inputs then go to the
        device of its first layer)."""
        placement = {"device_map": device_map, "max_memory": max_memory} if device_map else {}
        return cls(*models.load(model, adapter=adapter, device=device, **placement),
                   batch_size=batch_size)

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams
                 ) -> Iterator[tuple[int, Generation]]:
        sampling.validate()
        window = self.batch_size * SORT_WINDOW_BATCHES
        for start in range(0, len(prompts), window):
            order = sorted(range(start, min(start + window, len(prompts))),
                           key=lambda i: len(prompts[i]))
            for b in range(0, len(order), self.batch_size):
                indices = order[b: b + self.batch_size]
                # A distinct seed per batch, so sampled batches do not repeat each other.
                params = sampling if sampling.temperature == 0 else \
                    replace(sampling, seed=sampling.seed + indices[0])
                batch = self.generate_batch([prompts[i] for i in indices], params)
                yield from zip(indices, batch, strict=True)

    def generate_batch(self, prompts: Sequence[list[int]], sampling: SamplingParams
                       ) -> list[Generation]:
        """One left-padded batch (all prompts share each forward pass)."""
        import torch

        batch = {k: v.to(self.device) for k, v in left_pad(list(prompts), self.pad_id).items()}
        torch.manual_seed(sampling.seed)
        options = decoding_options(sampling)
        if sampling.stop:  # stop early; `finish` then cuts the text at the stop string
            options.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.cut is not None:  # stop a row once its cut applies; `finish` cuts
            options["stopping_criteria"] = _cut_criteria(self.tokenizer, sampling,
                                                         batch["input_ids"].shape[1])
        with torch.inference_mode():
            output = self.model.generate(**batch, **options, eos_token_id=self.stop_ids,
                                         pad_token_id=self.pad_id)
        rows = output[:, batch["input_ids"].shape[1]:].tolist()
        stops = set(self.stop_ids)
        # Stop strings and cuts are applied after generation, identically in both engines.
        generations = [finish(self.tokenizer, row, "length", sampling, stops) for row in rows]
        if sampling.logprobs:
            generations = self._with_topk(prompts, generations, sampling.logprobs)
        return generations

    def _with_topk(self, prompts: Sequence[list[int]], generations: list[Generation], k: int
                   ) -> list[Generation]:
        scored = [i for i, g in enumerate(generations) if g.token_ids]
        topks = self.score_batch([prompts[i] for i in scored],
                                 [generations[i].token_ids for i in scored], k)
        empty = TopK(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
        by_index = dict(zip(scored, topks, strict=True))
        return [replace(g, topk=by_index.get(i, empty)) for i, g in enumerate(generations)]

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: Sequence[list[int]], continuations: Sequence[list[int]], k: int
              ) -> Iterator[tuple[int, TopK]]:
        for start in range(0, len(prompts), self.batch_size):
            end = min(start + self.batch_size, len(prompts))
            topks = self.score_batch(prompts[start:end], continuations[start:end], k)
            yield from zip(range(start, end), topks, strict=True)

    def score_batch(self, prompts: Sequence[list[int]], answers: Sequence[list[int]], k: int
                    ) -> list[TopK]:
        """Top-k of the T=1 log-softmax at every answer token, by one forward pass."""
        import torch

        input_ids, attention_mask, width = _scoring_layout(prompts, answers, self.pad_id)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self._logits(input_ids, attention_mask, position_ids, width + 1)
            results = []
            for row, answer in enumerate(answers):
                # float32 before the softmax: bf16 log-probs would lose the tail.
                logprobs = logits[row, : len(answer)].float().log_softmax(dim=-1)
                values, ids = logprobs.topk(k, dim=-1)
                results.append(TopK(ids.to(torch.int32).cpu().numpy(),
                                    values.to(torch.float32).cpu().numpy()))
        return results

    def _logits(self, input_ids: Any, attention_mask: Any, position_ids: Any, keep: int) -> Any:
        inputs = {"input_ids": input_ids.to(self.device),
                  "attention_mask": attention_mask.to(self.device),
                  "position_ids": position_ids.to(self.device)}
        try:  # only the answer columns: never a full [batch, sequence, vocab] tensor
            return self.model(**inputs, logits_to_keep=keep).logits[:, -keep:]
        except TypeError:  # models without logits_to_keep
            return self.model(**inputs).logits[:, -keep:]


def _cut_criteria(tokenizer: Any, sampling: SamplingParams, prompt_width: int) -> Any:
    """A `StoppingCriteriaList` that ends each row once `sampling.cut` finds its end."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    trigger = sampling.cut_trigger

    def ended(ids: list[int]) -> bool:
        if not ids or (trigger is not None and trigger not in tokenizer.decode(
                ids[-1:], skip_special_tokens=True)):
            return False  # nothing new that could complete the cut (a finished row stays so)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        end = sampling.cut(text)
        return end is not None and end <= len(text)

    class CutStop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            return torch.tensor([ended(ids) for ids in input_ids[:, prompt_width:].tolist()],
                                dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CutStop()])


def decoding_options(sampling: SamplingParams) -> dict[str, Any]:
    """`generate` options that say everything: a model's `generation_config` fills in what a
    call leaves unset (Qwen2.5-Instruct ships repetition_penalty=1.05, top_k=20, ...), so every
    processor it could switch on is switched off here. Greedy is greedy; sampling is plain
    temperature + top-p."""
    import torch

    # Processors apply even to greedy decoding; warpers only when sampling.
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0,
               "num_beams": 1, "max_new_tokens": sampling.max_new_tokens}
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
        return {**neutral, "do_sample": True, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
                "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
    return {**neutral, "do_sample": False}


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


def _scoring_layout(prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int
                    ) -> tuple[Any, Any, int]:
    """input_ids and attention_mask with every answer starting at column P; and A."""
    import torch

    if any(not answer for answer in answers):
        raise ValueError("every answer needs at least one token to score")
    p_width = max(len(p) for p in prompts)
    a_width = max(len(a) for a in answers)
    input_ids = torch.full((len(prompts), p_width + a_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        start, end = p_width - len(prompt), p_width + len(answer)
        input_ids[row, start:end] = torch.tensor(prompt + answer, dtype=torch.long)
        attention_mask[row, start:end] = 1
    return input_ids, attention_mask, a_width
