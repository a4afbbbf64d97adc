"""`distill --on-policy` with a teacher of another tokenizer: the student's rollouts are read
by the teacher in its own tokens, and its scores are aligned back to the student's by text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from primekd.core.errors import PrimekdError
from primekd.core.testing import tiny_model
from primekd.distill import distill
from primekd.distill.config import DistillConfig
from primekd.teach import store

TOP_K = 6


def _config(student: Path, teacher: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(student), teacher=str(teacher), out=str(out), on_policy=True,
                alpha=0.0, rounds=1, round_size=3, batch_size=3, rollout_max_new_tokens=10,
                top_k=TOP_K, rollout_temperature=0.0, logging_steps=1, lr=1e-3,
                warmup_ratio=0.0, device="cpu", limit=3)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher whose BPE has 400 tokens (the student's 320): other merges, other ids."""
    return tiny_model(tmp_path_factory.mktemp("teacher400"), seed=3, vocab_size=400)


@pytest.fixture(scope="module", params=["uld", "mapped"])
def one_round(request, tiny_model_dir, other_teacher, tmp_path_factory) -> tuple[Path, dict, list]:
    out = tmp_path_factory.mktemp(f"xtok-onpolicy-{request.param}") / "run"
    result = distill(_config(tiny_model_dir, other_teacher, out, xtok_loss=request.param),
                     progress=False)
    return out, result.summary, result.log_history


def test_teacher_reads_the_rollout_text_in_its_own_tokens(tiny_model_dir, other_teacher,
                                                          one_round):
    from primekd.core.chat import encode_prompts
    from primekd.core.models import load, load_tokenizer, tokenizer_fingerprint
    from primekd.teach.spans import decode_text

    out, _, _ = one_round
    round_dir = out / "rounds" / "round-000"
    rows = store.load_store(round_dir).to_pylist()
    rollouts = {r["id"]: r for r in map(json.loads, (round_dir / "rollout.jsonl").open())}
    student_tok = load_tokenizer(str(tiny_model_dir))
    teacher, teacher_tok = load(str(other_teacher), device="cpu")
    assert store.read_manifest(round_dir)["tokenizer_fingerprint"] == \
        tokenizer_fingerprint(teacher_tok)
    assert len(rows) == 3
    for row in rows:
        text = decode_text(student_tok, rollouts[row["id"]]["token_ids"])
        assert row["answer_text"] == text and text
        assert decode_text(teacher_tok, row["token_ids"]) == text
        assert row["token_ids"] != rollouts[row["id"]]["token_ids"]  # other ids
        assert len(row["token_char_ends"]) == len(row["token_ids"])
        assert row["token_char_ends"][-1] == len(text)
        # the stored top-k is the teacher's own, after its primed prompt
        prompt = encode_prompts(teacher_tok, [row["teacher_prompt"]])[0]
        with torch.no_grad():
            logits = teacher.eval()(torch.tensor([prompt + row["token_ids"]])).logits
        values, top = logits[0, len(prompt) - 1:-1].float().log_softmax(-1).topk(TOP_K, -1)
        assert top.tolist() == row["topk_ids"]
        torch.testing.assert_close(torch.tensor(row["topk_logprobs"]), values,
                                   rtol=1e-4, atol=1e-4)


def test_the_student_trains_on_the_aligned_scores(one_round):
    out, summary, history = one_round
    rounds = summary["on_policy"]["rounds"]
    shares = rounds[0]["cross_tokenizer"]
    assert shares["xtok_loss"] in ("uld", "mapped")
    assert 0.0 < shares["chars_one_to_one"] <= 1.0
    if shares["xtok_loss"] == "mapped":
        assert shares["teacher_mass_mapped"] > 0.0
    assert rounds[0]["step"] >= 1 and rounds[0]["train_tokens"] > 0
    kd = [h["kd"] for h in history if "kd" in h]
    assert kd and all(v == v and v >= 0 for v in kd)  # the aligned KD term trained, no NaN
    assert (out / "adapter_model.safetensors").is_file()


def test_a_store_of_the_students_tokenizer_does_not_mix_with_it(tiny_model_dir, other_teacher,
                                                                tmp_path):
    """Off-policy rows in the student's tokens and on-policy rows aligned from the teacher's
    train under different losses: refused in one line, before any rollout."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distill import write_store

    store_dir = write_store(tiny_model_dir, tmp_path / "store", n=4, top_k=TOP_K)
    out = tmp_path / "run"
    with pytest.raises(PrimekdError, match="tokenizer") as caught:
        distill(_config(tiny_model_dir, other_teacher, out, teacher_store=str(store_dir),
                        lmbda=0.5), progress=False)
    assert "\n" not in str(caught.value)
    assert not list(out.rglob("rollout.jsonl"))
