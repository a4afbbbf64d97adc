"""Turn (system, user, prefill) messages into chat-template text and left-padded batches.

Every stage that shows text to a model goes through here, so the teacher, the student and
evaluation agree on what a prompt is, and the answer tokens start exactly where the
prompt ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class ChatPrompt:
    user: str
    system: str | None = None
    prefill: str = ""  # start of the assistant's reply, written for the model (response priming)


# The date in every student prompt (distill, on-policy rollouts, eval): the one Llama 3.x
# templates fall back to, so that training and evaluating on different days show the
# student one prompt (their templates insert today's date otherwise).
STUDENT_CHAT_DATE = "26 Jul 2024"


def chat_date(when: datetime | None = None) -> str:
    """Today's date as Llama 3.x templates write it ("26 Jul 2024"), for `date_string`."""
    return (when or datetime.now(UTC)).strftime("%d %b %Y")


def render(tokenizer: Any, prompt: ChatPrompt, date_string: str | None = None) -> str:
    """The exact text fed to the model, ending where the assistant's answer starts.

    `date_string` pins the date that templates such as Llama 3.2/3.3's insert (they read
    today's otherwise), so that a store resumed on another day keeps one prompt."""
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": prompt.user})
    if getattr(tokenizer, "chat_template", None):
        extra = {"date_string": date_string} if date_string else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False, **extra)
    else:  # base models without a template: a plain, readable layout
        system = f"{prompt.system}\n\n" if prompt.system else ""
        text = f"{system}Question: {prompt.user}\nAnswer: "
    return text + prompt.prefill


def encode_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # The template already holds any BOS token; adding special tokens again would double it.
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Left-pad token lists into input_ids and attention_mask tensors for generation."""
    import torch

    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
