"""`--stop-at-answer`: the stopping criterion and the cut, on real tokenizers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from primekd import answer_stop
from primekd.generation import Generation
from primekd.testing import tiny_tokenizer

TEXT = "She has 3 + 4 = 7 apples.\nThe answer is 7.\nNow let us also check 12 more"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_answer_prefix_is_the_shortest_prefix_holding_the_answer_line(tokenizer) -> None:
    ids = _ids(tokenizer, TEXT)
    n = answer_stop.answer_prefix(tokenizer, ids)
    assert n is not None
    kept = tokenizer.decode(ids[:n])
    assert kept.startswith("She has 3 + 4 = 7 apples.\nThe answer is 7.") and "Now" not in kept
    assert answer_stop.answer_prefix(tokenizer, ids[: n - 1]) is None
    assert answer_stop.answer_prefix(tokenizer, _ids(tokenizer, "7 apples\n")) is None


def test_stopping_criteria_stop_each_row_once_its_answer_line_ends(tokenizer) -> None:
    prompt = _ids(tokenizer, "Q: how many?\n")
    answer = _ids(tokenizer, TEXT)
    n = answer_stop.answer_prefix(tokenizer, answer)
    criteria = answer_stop.stopping_criteria(tokenizer, len(prompt))
    ramble = _ids(tokenizer, "She has 3 apples and 4 pears and more and more")
    width = min(len(ramble), n)
    for step in range(1, width + 1):
        batch = torch.tensor([prompt + answer[:step], prompt + ramble[:step]])
        done = criteria(batch, None).tolist()
        assert done == [step >= n, False]


def test_cut_generation_keeps_the_answer_line_and_ends_a_teacher_answer(tokenizer) -> None:
    ids = _ids(tokenizer, TEXT)
    generation = Generation(TEXT, ids, len(ids), "length")
    cut = answer_stop.cut_generation(tokenizer, generation)
    assert cut.text == "She has 3 + 4 = 7 apples.\nThe answer is 7."
    assert cut.finish_reason == "stop" and cut.n_tokens == len(cut.token_ids) < len(ids)

    @dataclass(frozen=True)
    class TeacherGeneration:
        token_ids: list[int]
        finish_reason: str

    eos = tokenizer.eos_token_id
    taught = answer_stop.cut_generation(tokenizer, TeacherGeneration(ids, "length"), eos)
    assert taught.token_ids[-1] == eos and taught.token_ids[:-1] == cut.token_ids
    unchanged = Generation("no answer yet", ids[:3], 3, "length")
    assert answer_stop.cut_generation(tokenizer, unchanged) is unchanged
