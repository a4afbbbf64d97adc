from __future__ import annotations

import pytest

from primekd.core.chat import render
from primekd.core.errors import PrimekdError
from primekd.core.testing import tiny_tokenizer
from primekd.evaluate.prompts import DEFAULT_TEMPLATE
from primekd.teach.priming import BUILTIN_STRATEGIES, all_strategies, get_strategy, load_strategies

QUESTION = "Ann has 2 cats and gets 3 more. How many cats does she have?"
REFERENCE = "She has 2 + 3 = <<2+3=5>>5 cats.\n#### 5"


def test_builtins_from_the_issue_with_the_papers_texts() -> None:
    assert {"none", "teacher", "ground_truth", "confidence", "student_friendly"} <= set(
        BUILTIN_STRATEGIES
    )
    none = get_strategy("none").render(QUESTION, REFERENCE, "5").user
    assert none == DEFAULT_TEMPLATE.replace("{{ question }}", QUESTION)  # the student's prompt
    teacher = get_strategy("teacher").render(QUESTION, REFERENCE, "5").user
    assert teacher.startswith(
        "As a teacher, guide your student through solving the question below. Provide a "
        "clear, simple explanation for someone unfamiliar with the problem."
    )
    friendly = get_strategy("student_friendly").render(QUESTION, REFERENCE, "5").user
    assert "feasible for smaller models to understand and learn from without losing too " \
           "much detail" in friendly
    assert "double-check" in get_strategy("confidence").render(QUESTION, REFERENCE, "5").user
    for strategy in BUILTIN_STRATEGIES.values():
        user = strategy.render(QUESTION, REFERENCE, "5").user
        assert QUESTION in user
        # the answer line grading and stop-at-answer look for, as the student is asked
        assert 'the form "The answer is N"' in user


def test_ground_truth_shows_the_answer_and_solution_variant_the_reference() -> None:
    prompt = get_strategy("ground_truth").render(QUESTION, REFERENCE, "5")
    assert "The correct final answer is 5." in prompt.user
    assert "do not mention" in prompt.user
    assert REFERENCE in get_strategy("ground_truth_solution").render(QUESTION, REFERENCE, "5").user


def test_prefill_and_system_reach_the_chat_text() -> None:
    chat = get_strategy("step_by_step").render(QUESTION, REFERENCE, "5")
    text = render(tiny_tokenizer(), chat)
    assert text.endswith("<|im_start|>assistant\nLet's solve this step by step.")


def test_user_strategies_from_yaml(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "strategies:\n"
        "  careful:\n"
        "    description: verify\n"
        "    system: You are careful.\n"
        "    user: \"{{ question }} (answer: {{ answer }})\"\n"
        "    prefill: 'Step 1:'\n"
    )
    strategy = get_strategy("careful", path)
    chat = strategy.render(QUESTION, REFERENCE, "5")
    assert chat.user == f"{QUESTION} (answer: 5)"
    assert chat.system == "You are careful."
    assert chat.prefill == "Step 1:"
    assert set(BUILTIN_STRATEGIES) < set(all_strategies(path))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("  s1:\n    user: '{{ question '\n", r"strategy 's1', field 'user': template error"),
        ("  s1:\n    user: '{{ questoin }}'\n",
         r"strategy 's1', field 'user': unknown var.*questoin"),
        ("  s1:\n    user: '{{ question }}'\n    prefill: '{% if %}'\n",
         r"strategy 's1', field 'prefill'"),
        ("  s1:\n    user: '{{ question }}'\n    sytem: hi\n",
         r"strategy 's1': unknown field 'sytem'"),
        ("  s1:\n    description: no user\n", r"strategy 's1', field 'user': required"),
        ("  s1:\n    user: '  '\n", r"strategy 's1', field 'user': required, a non-empty"),
        ("  s1:\n    user: '{{ question }}'\n    description: 5\n",
         r"strategy 's1', field 'description': must be a string"),
        ("  s1: just text\n", r"strategy 's1': expected a mapping with at least a `user`"),
        # a YAML key that is not a string (it crashed the hand-written check)
        ("  s1:\n    user: '{{ question }}'\n    1: x\n", r"strategy 's1': unknown field 1;"),
        ("  s1:\n    user: '{{ question | nosuchfilter }}'\n", r"strategy 's1', field 'user'"),
        ("  teacher:\n    user: '{{ question }}'\n", r"name of a built-in"),
        # str.format braces would reach the teacher literally: refused, with the Jinja spelling.
        ("  s1:\n    user: 'Solve {question}'\n",
         r"field 'user': \{question\} is str.format syntax; .*write \{\{ question \}\} instead"),
        ("  s1:\n    user: '{{ question }}'\n    system: 'Answer is { answer }'\n",
         r"field 'system': \{ answer \} is str.format syntax"),
        ("  s1:\n    user: 'Solve it. Answer: {{ answer }}'\n",
         r"strategy 's1': no \{\{ question \}\} placeholder"),
    ],
)
def test_yaml_errors_name_file_strategy_and_field(tmp_path, body, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("strategies:\n" + body)
    with pytest.raises(PrimekdError, match=message) as error:
        all_strategies(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_yaml_file_shape_errors(tmp_path) -> None:
    with pytest.raises(PrimekdError, match="does not exist"):
        load_strategies(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(PrimekdError, match="strategies:"):
        load_strategies(bad)
    bad.write_text("strategies: [unclosed\n")
    with pytest.raises(PrimekdError, match="not valid YAML"):
        load_strategies(bad)


def test_unknown_strategy_lists_the_choices() -> None:
    with pytest.raises(PrimekdError, match="unknown strategy 'nope'.*ground_truth"):
        get_strategy("nope")
