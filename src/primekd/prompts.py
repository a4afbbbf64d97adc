"""Evaluation prompt templates: zero-shot, few-shot, or the user's own.

A template is the user turn of the chat, with a `{question}` placeholder (write `{{` and
`}}` for literal braces). Few-shot examples are worked GSM8K train solutions placed before
the template's text in the same user turn, each ending with the answer line the model is
asked to write, so the model sees the format it should follow.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from primekd.chat import ChatPrompt
from primekd.data import load_examples, strip_calculator
from primekd.errors import PrimekdError

DEFAULT_TEMPLATE = (
    "Solve the following math problem. Think step by step, then write the final answer "
    'on its own last line in the form "The answer is N", where N is a number.\n\n'
    "Question: {question}"
)
PLACEHOLDERS = ("question",)
FEW_SHOT_STOP = "\nQuestion:"


@dataclass(frozen=True)
class PromptTemplate:
    """A resolved template: its text, the few-shot block (if any), and how to apply them."""

    text: str
    few_shot: int = 0
    examples_text: str = ""

    @property
    def stop(self) -> tuple[str, ...]:
        # After inline examples a small model tends to go on with a question of its own.
        return (FEW_SHOT_STOP,) if self.examples_text else ()

    def build(self, question: str) -> ChatPrompt:
        body = self.text.format(question=question)
        if self.examples_text:
            body = f"{self.examples_text}\n\n{body}"
        return ChatPrompt(user=body)


def load_template(prompt: str | None = None, few_shot: int = 0) -> PromptTemplate:
    """Resolve `--prompt` (None, template text, or a path to a file) and `--few-shot K`."""
    text = DEFAULT_TEMPLATE if prompt is None else _read_template(prompt)
    check_template(text)
    if few_shot < 0:
        raise PrimekdError("--few-shot must not be negative")
    return PromptTemplate(text, few_shot, few_shot_block(few_shot) if few_shot else "")


def _read_template(prompt: str) -> str:
    # A template holds `{question}`; a short string without braces naming a file is a path.
    if "{" not in prompt and "\n" not in prompt and len(prompt) < 4096:
        path = Path(prompt).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if path.suffix in {".txt", ".md", ".jinja", ".tmpl", ".prompt"}:
            raise PrimekdError(f"prompt template file {prompt} does not exist")
    return prompt


def check_template(text: str) -> None:
    """Reject templates with unknown or malformed placeholders, or no `{question}`."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
        raise PrimekdError(
            f"prompt template is malformed ({e}); write literal braces as {{{{ and }}}}"
        ) from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        names = ", ".join("{" + u + "}" for u in unknown)
        raise PrimekdError(
            f"prompt template has unknown placeholder(s) {names}; the only placeholder is "
            "{question} (write literal braces as {{ and }})"
        )
    if "question" not in fields:
        raise PrimekdError("prompt template has no {question} placeholder: where does it go?")


def worked_solution(answer: str) -> str:
    """A GSM8K reference rewritten as the reply we ask for: steps, then `The answer is N.`."""
    steps, _, final = answer.rpartition("####")
    steps = strip_calculator(steps).strip()
    return f"{steps}\nThe answer is {final.strip()}."


def few_shot_block(k: int) -> str:
    """The first k GSM8K train problems with worked solutions (fixed, so runs compare)."""
    shots = load_examples("train", limit=k)
    parts = [f"Question: {e.question}\nSolution: {worked_solution(e.answer)}" for e in shots]
    return "Here are some solved examples.\n\n" + "\n\n".join(parts)
