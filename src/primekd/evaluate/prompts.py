"""Evaluation prompt templates: zero-shot, few-shot, or the user's own.

A template is the user turn of the chat: a Jinja template (the language strategies use
too) with a `{{ question }}` placeholder. Few-shot examples are worked GSM8K train solutions
placed before the template's text in the same user turn, each ending with the answer line
the model is asked to write, so the model sees the format it should follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from primekd.core import templates
from primekd.core.chat import ChatPrompt
from primekd.core.data import load_examples, strip_calculator
from primekd.core.errors import PrimekdError
from primekd.core.io import read_text

DEFAULT_TEMPLATE = (
    "Solve the following math problem. Think step by step, then write the final answer "
    'on its own last line in the form "The answer is N", where N is a number.\n\n'
    "Question: {{ question }}"
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
        body = templates.render(self.text, {"question": question}, "prompt template")
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
    # A template holds `{{ question }}`; a short string without braces naming a file is a path.
    if "{" not in prompt and "\n" not in prompt and len(prompt) < 4096:
        path = Path(prompt).expanduser()
        if path.is_file():
            return read_text(path, "prompt template file")
        if path.suffix in {".txt", ".md", ".jinja", ".tmpl", ".prompt"}:
            raise PrimekdError(f"prompt template file {prompt} does not exist")
    return prompt


def check_template(text: str) -> None:
    """Reject templates with unknown or malformed placeholders, or no `{{ question }}`."""
    where = "prompt template"
    templates.require(templates.check(text, PLACEHOLDERS, where, {"question": "?"}),
                      "question", where)


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
