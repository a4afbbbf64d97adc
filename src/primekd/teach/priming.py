"""Response-priming strategies: how the teacher is asked, never what the student sees.

A strategy is a Jinja2 template for the user message over `question`, `reference` (the full
reference solution) and `answer` (the gold number), plus an optional system message and an
optional prefill (the start of the assistant's reply, written for the teacher). Built-ins
follow Goyal et al. (2024); users add their own from a YAML file:

    strategies:
      careful:
        description: Solve, then verify.
        system: You are a careful math tutor.
        user: "{{ question }}\\n\\nSolve it, then check the result."
        prefill: "Let's solve this step by step."
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from primekd.core import templates
from primekd.core.chat import ChatPrompt
from primekd.core.errors import PrimekdError, did_you_mean
from primekd.core.io import read_yaml
from primekd.evaluate.prompts import DEFAULT_TEMPLATE

VARIABLES = ("question", "reference", "answer")
# Every built-in asks for the final-answer line the student's prompt asks for, so that the
# priming is the only difference between teachers, answers end where grading and
# stop-at-answer look, and students learn the format they are graded on.
ANSWER_LINE = ('Write the final answer on its own last line in the form "The answer is N", '
               "where N is a number.")
TEMPLATE_FIELDS = ("user", "system", "prefill")
_EXAMPLE = {
    "question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
    "reference": "Tom has 3 + 2 = <<3+2=5>>5 apples.\n#### 5",
    "answer": "5",
}


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    user: str  # Jinja2 template over VARIABLES
    system: str | None = None
    prefill: str = ""

    def render(self, question: str, reference: str, answer: str) -> ChatPrompt:
        """The teacher's messages for one question."""
        context = {"question": question, "reference": reference, "answer": answer}
        system = _render(self, "system", context) if self.system else None
        prefill = _render(self, "prefill", context) if self.prefill else ""
        return ChatPrompt(user=_render(self, "user", context), system=system, prefill=prefill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BUILTIN_STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy(
            name="none",
            description="The student's own prompt, no priming (the baseline teacher).",
            user=DEFAULT_TEMPLATE,
        ),
        Strategy(
            name="teacher",
            description="The paper's teacher framing: explain simply, as to a student.",
            user=(
                "As a teacher, guide your student through solving the question below. "
                "Provide a clear, simple explanation for someone unfamiliar with the "
                "problem. " + ANSWER_LINE + "\n\nQuestion: {{ question }}"
            ),
        ),
        Strategy(
            name="ground_truth",
            description="The teacher is shown the correct final answer and solves as if fresh.",
            user=(
                "Solve the following math problem step by step. The correct final answer "
                "is {{ answer }}. Work through the problem as if you were solving it for "
                "the first time, with clear reasoning that arrives at this answer, and do "
                "not mention that you were given the answer. " + ANSWER_LINE
                + "\n\nQuestion: {{ question }}"
            ),
        ),
        Strategy(
            name="ground_truth_solution",
            description="Like ground_truth, but the teacher sees the whole reference solution.",
            user=(
                "Solve the following math problem step by step. Here is a correct reference "
                "solution:\n\n{{ reference }}\n\nWrite your own clear, step-by-step solution "
                "as if you were solving the problem for the first time, arriving at the "
                "same final answer, and do not mention that you were given a solution. "
                + ANSWER_LINE + "\n\nQuestion: {{ question }}"
            ),
        ),
        Strategy(
            name="confidence",
            description="Ask the teacher to briefly double-check its answer before finishing.",
            user=(
                "{{ question }}\n\nSolve the problem step by step. Before you give your "
                "final answer, briefly double-check your calculations. " + ANSWER_LINE
            ),
        ),
        Strategy(
            name="student_friendly",
            description="The prompt in the paper's code: clear and learnable for small models.",
            user=(
                "As a smart language model, provide a detailed answer that is clear and "
                "feasible for smaller models to understand and learn from without losing "
                "too much detail. " + ANSWER_LINE + "\n\nQuestion: {{ question }}"
            ),
        ),
        Strategy(
            name="step_by_step",
            description="Literal response priming: the teacher's reply starts with a prefill.",
            user=DEFAULT_TEMPLATE,
            prefill="Let's solve this step by step.",
        ),
    ]
}


def get_strategy(name: str, strategies_file: str | Path | None = None) -> Strategy:
    """A built-in strategy, or one from a user's YAML file."""
    available = all_strategies(strategies_file)
    if name not in available:
        raise PrimekdError(
            f"unknown strategy {name!r}{did_you_mean(name, available)}; "
            f"choose one of {', '.join(available)} "
            "(see `primekd teach --list-strategies`)"
        )
    return available[name]


def all_strategies(strategies_file: str | Path | None = None) -> dict[str, Strategy]:
    """Built-ins followed by the user's strategies (which may not reuse a built-in name)."""
    strategies = dict(BUILTIN_STRATEGIES)
    if strategies_file is not None:
        for name, strategy in load_strategies(strategies_file).items():
            if name in strategies:
                raise PrimekdError(
                    f"{strategies_file}: strategy {name!r} has the name of a built-in "
                    "strategy; give it another name"
                )
            strategies[name] = strategy
    return strategies


def load_strategies(path: str | Path) -> dict[str, Strategy]:
    """Read and check strategies from YAML; every error names the file, strategy and field."""
    path = Path(path)
    document = read_yaml(path, "strategies file")
    if not isinstance(document, dict) or not isinstance(document.get("strategies"), dict):
        raise PrimekdError(
            f"{path}: expected a top-level `strategies:` mapping of name -> "
            "{description, user, system, prefill}"
        )
    return {
        str(name): parse_strategy(str(name), spec, f"{path}: strategy {str(name)!r}")
        for name, spec in document["strategies"].items()
    }


@functools.cache
def _fields_model() -> Any:
    """The pydantic model of one strategy's fields (built on first use: pydantic stays out
    of the CLI's start-up)."""
    from pydantic import BaseModel, ConfigDict, Field

    class StrategyFields(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        description: str | None = None
        user: str = Field(pattern=r"\S")  # required, not blank: the teacher's message
        system: str | None = None
        prefill: str | None = None

    return StrategyFields


def parse_strategy(name: str, spec: Any, where: str) -> Strategy:
    """A strategy from its fields (`user`, and optionally `description`, `system`,
    `prefill`), checked: field names and types, then each template (Jinja syntax, known
    variables, the question placeholder somewhere). `where` starts every error message."""
    from pydantic import ValidationError

    try:
        fields = _fields_model().model_validate(spec)
    except ValidationError as error:
        raise _fields_error(error, where) from None
    strategy = Strategy(name=name, description=fields.description or "", user=fields.user,
                        system=fields.system or None, prefill=fields.prefill or "")
    used: set[str] = set()
    for field in TEMPLATE_FIELDS:
        source = getattr(strategy, field)
        if source:
            used |= templates.check(source, VARIABLES, f"{where}, field {field!r}", _EXAMPLE)
    templates.require(used, "question", where)
    return strategy


def _fields_error(error: Any, where: str) -> PrimekdError:
    """pydantic's errors as one line, the first of: not a mapping, an unknown field, a
    missing or blank `user`, a field that is not a string."""
    problems = error.errors()
    kinds = {p["type"] for p in problems}
    if "model_type" in kinds:
        return PrimekdError(f"{where}: expected a mapping with at least a `user` field")
    unknown = [p["loc"][0] for p in problems if p["type"] in ("extra_forbidden", "invalid_key")]
    if unknown:
        allowed = list(_fields_model().model_fields)
        return PrimekdError(f"{where}: unknown field {unknown[0]!r}"
                            f"{did_you_mean(str(unknown[0]), allowed)}; "
                            f"allowed fields: {', '.join(sorted(allowed))}")
    fields = [p["loc"][0] for p in problems]
    if "user" in fields:
        return PrimekdError(f"{where}, field 'user': required, a non-empty template string")
    return PrimekdError(f"{where}, field {fields[0]!r}: must be a string")


def _render(strategy: Strategy, field: str, context: dict[str, str]) -> str:
    where = f"strategy {strategy.name!r}, field {field!r}"
    return templates.render(getattr(strategy, field), context, where)
