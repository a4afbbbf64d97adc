"""The transformers teacher backend: batched generation, then one teacher-forced scoring pass.

Scoring is the one place the teacher's distributions come from, for generated answers and
for reference solutions alike, so alignment is written (and tested) once. Layout of a
scoring batch: prompts left-padded to width P, answers right-padded to width A:

    [pad pad p0 p1 ... p_{P-1} | a0 a1 ... a_{n-1} pad pad]

The logit at column c predicts the token at column c + 1, so the distribution for answer
token t is read at column P - 1 + t: the last A + 1 columns hold every answer position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from primekd.chat import left_pad
from primekd.models import ModelSource, load_model, load_tokenizer


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # answer tokens, the stop token included when there was one
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class TopK:
    ids: np.ndarray  # [answer tokens, k] int32, most likely first
    logprobs: np.ndarray  # [answer tokens, k] float32, full-vocabulary log-softmax at T=1


class HFTeacher:
    name = "hf"

    def __init__(self, source: ModelSource, device: str | None = None) -> None:
        self.model = load_model(source, device=device)
        self.tokenizer = load_tokenizer(source)
        self.device = next(self.model.parameters()).device
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)

    def generate(
        self,
        prompts: Sequence[list[int]],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        stop_at_answer: bool = False,
    ) -> list[Generation]:
        import torch

        batch = {k: v.to(self.device) for k, v in left_pad(list(prompts), self.pad_id).items()}
        if temperature > 0:  # plain temperature sampling: no top-k/top-p truncation
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        if stop_at_answer:  # rows end early; teacher.run_batch cuts the tokens
            from primekd.answer_stop import stopping_criteria

            sampling["stopping_criteria"] = stopping_criteria(self.tokenizer,
                                                              batch["input_ids"].shape[1])
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = self.model.generate(
                **batch,
                **sampling,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.stop_ids,
            )
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        return [_cut_at_stop(ids, self.stop_ids) for ids in new_tokens]

    def score(
        self, prompts: Sequence[list[int]], answers: Sequence[list[int]], top_k: int
    ) -> list[TopK]:
        """Top-k teacher distribution at every answer token, by one forward pass."""
        import torch

        input_ids, attention_mask, width = _scoring_layout(prompts, answers, self.pad_id)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self._logits(input_ids, attention_mask, position_ids, width + 1)
            results = []
            for row, answer in enumerate(answers):
                # float32 before the softmax: bf16 log-probs would lose the tail.
                logprobs = logits[row, : len(answer)].float().log_softmax(dim=-1)
                values, ids = logprobs.topk(top_k, dim=-1)
                results.append(TopK(ids.to(torch.int32).cpu().numpy(),
                                    values.to(torch.float32).cpu().numpy()))
        return results

    def _logits(self, input_ids: Any, attention_mask: Any, position_ids: Any, keep: int) -> Any:
        inputs = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "position_ids": position_ids.to(self.device),
        }
        try:  # only the answer columns: never a full [batch, sequence, vocab] tensor
            return self.model(**inputs, logits_to_keep=keep).logits[:, -keep:]
        except TypeError:  # models without logits_to_keep
            return self.model(**inputs).logits[:, -keep:]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the generation config's EOS ids, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


def _cut_at_stop(ids: list[int], stop_ids: Sequence[int]) -> Generation:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return Generation(ids[: position + 1], "stop")
    return Generation(ids, "length")


def _scoring_layout(
    prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int
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
