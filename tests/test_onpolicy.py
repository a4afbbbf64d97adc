"""`primekd distill --on-policy`: the student's own tokens, scored by the primed teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from primekd.core.errors import PrimekdError
from primekd.distill import distill
from primekd.distill.config import DistillConfig
from primekd.distill.data import KDCollator, build_datasets, student_prompts
from primekd.distill.trainer import KDSettings, KDTrainer, training_arguments
from primekd.teach import store

sys.path.insert(0, str(Path(__file__).parent))
from test_distill import write_store  # noqa: E402  the off-policy store of the distill tests

TOP_K = 8


def _config(model: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(model), out=str(out), on_policy=True, alpha=0.0, rounds=2,
                round_size=4, batch_size=2, rollout_max_new_tokens=12, top_k=TOP_K,
                rollout_temperature=0.0, logging_steps=1, lr=1e-3, warmup_ratio=0.0,
                device="cpu", limit=6)
    base.update(kw)
    return DistillConfig(**base)


def _rows(directory: Path) -> list[dict]:
    return sorted(store.load_store(directory).to_pylist(), key=lambda r: (r["id"], r["sample"]))


def _base(model_dir: Path):
    from primekd.core.models import load

    model, tok = load(str(model_dir), device="cpu")
    return model.eval(), tok


def _prompt_ids(tok, text: str) -> list[int]:
    from primekd.core.chat import encode_prompts

    return encode_prompts(tok, [text])[0]


@pytest.fixture(scope="module")
def one_round(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onpolicy") / "run"
    distill(_config(tiny_model_dir, out, rounds=1), progress=False)
    return out


def test_training_tokens_are_the_students_own_greedy_answers(tiny_model_dir, one_round):
    """Round 0's student is the base model (LoRA starts at zero): its greedy answers to the
    bare prompt are the store's token_ids and the training sequences, not the references."""
    from primekd.core.models import load_tokenizer
    from primekd.engines import SamplingParams, collect
    from primekd.engines.hf import HFEngine

    rows = _rows(one_round / "rounds" / "round-000")
    assert len(rows) == 4 and {r["sample"] for r in rows} == {0}
    model, tok = _base(tiny_model_dir)
    prompts = student_prompts(tok, [r["question"] for r in rows], None)
    engine = HFEngine(model, tok)
    answers = collect(engine.generate(prompts, SamplingParams(12)), len(rows))
    assert [r["token_ids"] for r in rows] == [a.token_ids for a in answers]
    reference = tok(rows[0]["reference"], add_special_tokens=False)["input_ids"]
    assert rows[0]["token_ids"] != reference[: len(rows[0]["token_ids"])]

    train_tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    config = _config(tiny_model_dir, one_round, teacher_store=str(one_round / "rounds" /
                                                                  "round-000"), on_policy=False)
    items = {i.id: i for i in build_datasets(config, train_tok).train}
    for row, prompt in zip(rows, prompts, strict=True):
        assert items[row["id"]].input_ids.tolist() == prompt + row["token_ids"]
    manifest = store.read_manifest(one_round / "rounds" / "round-000")
    assert manifest["target"] == "student" and manifest["complete"]


def test_teacher_scores_come_from_the_primed_prompt(tiny_model_dir, one_round):
    """The teacher read the ground truth (absent from the student's prompt), and the stored
    top-k is the base model's distribution over the student's tokens after that prompt."""
    from primekd.core.chat import encode_prompts, render
    from primekd.core.data import load_examples
    from primekd.teach.priming import get_strategy
    from primekd.teach.teacher import answer_text

    rows = _rows(one_round / "rounds" / "round-000")
    model, tok = _base(tiny_model_dir)
    examples = {e.id: e for e in load_examples("train", limit=6)}
    strategy = get_strategy("ground_truth")
    for row in rows[:2]:
        example = examples[row["id"]]
        gold = answer_text(example)
        student_text = tok.decode(student_prompts(tok, [row["question"]], None)[0])
        assert f"The correct final answer is {gold}" in row["teacher_prompt"]
        assert "correct final answer" not in student_text
        teacher_text = render(tok, strategy.render(example.question, example.answer, gold))
        assert row["teacher_prompt"] == teacher_text
        prompt = encode_prompts(tok, [teacher_text])[0]
        ids = torch.tensor([prompt + row["token_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        values, top = logits.log_softmax(-1).topk(TOP_K, -1)
        assert top.tolist() == row["topk_ids"]
        torch.testing.assert_close(torch.tensor(row["topk_logprobs"]), values,
                                   rtol=1e-4, atol=1e-4)
        # Not the student's own view: under the bare prompt the distribution differs.
        bare = student_prompts(tok, [row["question"]], None)[0]
        with torch.no_grad():
            unprimed = model(torch.tensor([bare + row["token_ids"]])).logits[0, len(bare) - 1:-1]
        assert not torch.allclose(unprimed.float().log_softmax(-1).topk(TOP_K, -1).values,
                                  values, atol=1e-3)


def test_loss_equals_dense_teacher_computation_at_k_vocab(tiny_model_dir, tmp_path):
    """With k = vocabulary the round's stored teacher is the whole distribution: the training
    loss on a batch equals reverse KL from the dense primed-teacher softmax."""
    from primekd.core.chat import encode_prompts
    from primekd.core.models import load_tokenizer
    from primekd.distill.kd_loss import dense_kd_loss
    from primekd.distill.trainer import build_student

    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    vocab = len(tok)
    out = tmp_path / "dense"
    distill(_config(tiny_model_dir, out, rounds=1, top_k=vocab, round_size=2), progress=False)
    round_dir = out / "rounds" / "round-000"
    config = _config(tiny_model_dir, tmp_path / "x", teacher_store=str(round_dir),
                     on_policy=False)
    items = build_datasets(config, tok).train
    batch = KDCollator(tok.pad_token_id)(items)
    args = training_arguments(config, tmp_path / "x", "cpu", False, False)
    student = build_student(config, "cpu").eval()
    trainer = KDTrainer(model=student, args=args, kd=KDSettings(alpha=0.0,
                                                                divergence="reverse_kl"))
    with torch.no_grad():
        parts = trainer.loss_parts(student, batch)
        student_logits = student(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
    # The dense teacher: the base model over the primed prompt + the student's tokens, its
    # logits placed where the student's logits for the same tokens are.
    model, _ = _base(tiny_model_dir)
    rows = {r["id"]: r for r in _rows(round_dir)}
    teacher_logits = torch.zeros_like(student_logits)
    for b, item in enumerate(items):
        row = rows[item.id]
        prompt = encode_prompts(tok, [row["teacher_prompt"]])[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row["token_ids"]])).logits[0]
        n = len(row["token_ids"])
        teacher_logits[b, item.n_prompt - 1: item.n_prompt - 1 + n] = \
            logits[len(prompt) - 1: len(prompt) - 1 + n]
    dense = dense_kd_loss(student_logits, teacher_logits, batch["labels"], alpha=0.0,
                          kind="reverse_kl")
    assert parts.n_kd == sum(len(rows[i.id]["token_ids"]) for i in items)
    torch.testing.assert_close(parts.loss / parts.n_ce, dense, rtol=1e-4, atol=1e-5)


def test_lmbda_zero_reproduces_off_policy_training(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    teacher = write_store(tiny_model_dir, tmp_path / "teacher", n=6, top_k=TOP_K)
    off = distill(DistillConfig(student=str(tiny_model_dir), teacher_store=str(teacher),
                                out=str(tmp_path / "off"), batch_size=2, lr=1e-3,
                                warmup_ratio=0.0, device="cpu", logging_steps=1, alpha=0.3),
                  progress=False)
    on = distill(_config(tiny_model_dir, tmp_path / "on", teacher_store=str(teacher),
                         lmbda=0.0, rounds=1, round_size=6, alpha=0.3, limit=None),
                 progress=False)
    assert on.summary["steps"] == off.summary["steps"] == 3
    assert not (tmp_path / "on" / "rounds").exists() or not any(
        (tmp_path / "on" / "rounds").iterdir())
    a = load_file(str(tmp_path / "off" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "on" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert on.summary["final_train_loss"] == off.summary["final_train_loss"]


def test_lmbda_mixes_on_and_off_policy_sequences(tiny_model_dir, tmp_path):
    teacher = write_store(tiny_model_dir, tmp_path / "teacher", n=6, top_k=TOP_K)
    result = distill(_config(tiny_model_dir, tmp_path / "mix", teacher_store=str(teacher),
                             lmbda=0.5, rounds=1, round_size=4, rollout_stop_at_answer=True),
                     progress=False)
    (record,) = result.summary["on_policy"]["rounds"]
    assert record["on_sequences"] == 2 and record["off_sequences"] == 2
    assert len(_rows(tmp_path / "mix" / "rounds" / "round-000")) == 2
    assert result.summary["steps"] == 2


def test_bad_on_policy_options_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(PrimekdError, match="--lmbda must be in"):
        distill(_config(tiny_model_dir, tmp_path / "a", lmbda=1.5), progress=False)
    with pytest.raises(PrimekdError, match="--teacher-store"):
        distill(_config(tiny_model_dir, tmp_path / "b", lmbda=0.5), progress=False)
    with pytest.raises(PrimekdError, match="--rollout-temperature"):
        distill(_config(tiny_model_dir, tmp_path / "c", samples_per_question=2),
                progress=False)
    teacher = write_store(tiny_model_dir, tmp_path / "teacher", n=4, top_k=TOP_K)
    with pytest.raises(PrimekdError, match="--top-k 8"):
        distill(_config(tiny_model_dir, tmp_path / "d", teacher_store=str(teacher), lmbda=0.5,
                        top_k=5), progress=False)


def _cli_args(model: Path, out: Path) -> list[str]:
    return ["distill", "--on-policy", "--student", str(model), "--out", str(out),
            "--rounds", "3", "--round-size", "4", "--batch-size", "2", "--limit", "8",
            "--rollout-max-new-tokens", "48", "--rollout-temperature", "0.8",
            "--samples-per-question", "2", "--top-k", str(TOP_K), "--lr", "1e-3",
            "--device", "cpu", "--quiet", "--json"]


# Runs the CLI with a SIGKILL at a chosen point: before or after the nth call of a function.
_KILLED_AT = """
import os, signal, sys
from primekd.distill import onpolicy, trainer
owner, name, nth, when = sys.argv[1:5]
del sys.argv[1:5]
target = {"onpolicy": onpolicy, "trainer": trainer.KDTrainer}[owner]
original, calls = getattr(target, name), [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls[0] == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(target, name, killing)
from primekd.cli import main
main()
"""


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole")
    args = [a for a in _cli_args(tiny_model_dir, whole) if a != "--quiet"]  # progress on
    done = subprocess.run([sys.executable, "-c", "from primekd.cli import main; main()", *args],
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # --json's stdout is the summary alone; the per-round lines are progress, on stderr
    assert json.loads(done.stdout)["on_policy"]["rounds"][2]["round"] == 2
    assert "round 2:" in done.stderr
    return whole


# Round 0 has 8 rollouts and one checkpoint; each point lies in round 1.
KILL_POINTS = {
    "mid-rollout": ("onpolicy", "append_jsonl", 11, "after"),  # 3 of round 1's 8 saved
    "before-scoring": ("onpolicy", "_score", 2, "before"),
    "checkpoint-saved": ("trainer", "_save_checkpoint", 2, "after"),  # rounds.json not yet
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_and_resume_loses_and_repeats_nothing(tiny_model_dir, uninterrupted, tmp_path,
                                                   point):
    """SIGKILL the CLI inside round 1 (at points chosen deterministically, not by timing);
    `--resume` finishes with every round's rows exactly once, identical to an uninterrupted
    run's, and the same adapter."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT,
                             *map(str, KILL_POINTS[point]), *_cli_args(tiny_model_dir, out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert len(rounds) == 1  # killed in round 1

    again = subprocess.run([sys.executable, "-c", "from primekd.cli import main; main()",
                            *_cli_args(tiny_model_dir, out), "--resume"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout)
    assert [r["round"] for r in summary["on_policy"]["rounds"]] == [0, 1, 2]
    for r in range(3):
        round_dir = f"rounds/round-{r:03d}"
        rows = _rows(out / round_dir)
        keys = [(x["id"], x["sample"]) for x in rows]
        assert len(keys) == len(set(keys)) == 8
        assert [(x["id"], x["sample"], x["token_ids"]) for x in rows] == \
            [(x["id"], x["sample"], x["token_ids"]) for x in _rows(uninterrupted / round_dir)]
    a = load_file(str(uninterrupted / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_run_config_on_policy_entries(tmp_path):
    from primekd.experiment.config import config_from_dict
    from primekd.experiment.stages import plan

    def build(*entries):
        return config_from_dict({"strategies": ["none", "ground_truth"],
                                 "on_policy": list(entries)})

    config = build({"strategy": "ground_truth"},
                   {"strategy": "ground_truth", "name": "op-mix", "lmbda": 0.5,
                    "divergence": "jsd"})
    assert config.experiments[-2:] == ["op-ground_truth", "op-mix"]
    stages = {s.name: s for s in plan(config, tmp_path)}
    pure, mix = stages["students/op-ground_truth"], stages["students/op-mix"]
    assert pure.params["on_policy"] and pure.params["alpha"] == 0.0
    assert pure.params["strategy"] == "ground_truth" and pure.upstream == ()
    assert "teacher_store" not in pure.paths and pure.paths["data"].name == "transfer.jsonl"
    assert mix.upstream == ("teacher/ground_truth",) and mix.params["divergence"] == "jsd"
    assert mix.paths["teacher_store"] == tmp_path / "teacher" / "ground_truth"
    assert "eval/op-mix" in stages and pure.hash != mix.hash
    for entry, message in (({"strategy": "teacher"}, "must name one of"),
                           ({"strategy": "none", "name": "kd-none"}, "is taken"),
                           ({"strategy": "none", "lmbdaa": 1}, "lmbdaa"),
                           ({"strategy": "none", "student": "x"}, "set by the experiment"),
                           ({"strategy": "none", "lmbda": "high"}, "lmbda")):
        with pytest.raises(PrimekdError, match=message):
            build(entry)


def test_each_round_rolls_out_the_student_trained_so_far(tiny_model_dir, tmp_path):
    """Round 1's rollouts (same questions as round 0) are the greedy answers of the adapter
    checkpointed at the end of round 0, and differ from round 0's: the student moved."""
    from peft import PeftModel

    from primekd.engines import SamplingParams, collect
    from primekd.engines.hf import HFEngine

    out = tmp_path / "two"
    distill(_config(tiny_model_dir, out, rounds=2, round_size=4, limit=4, lr=5e-2),
            progress=False)
    first, second = (_rows(out / "rounds" / f"round-00{r}") for r in (0, 1))
    assert [r["id"] for r in first] == [r["id"] for r in second]
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in second]
    checkpoint = json.loads((out / "rounds.json").read_text())["rounds"][0]["checkpoint"]
    base, tok = _base(tiny_model_dir)
    student = PeftModel.from_pretrained(base, checkpoint).eval()
    prompts = student_prompts(tok, [r["question"] for r in second], None)
    answers = collect(HFEngine(student, tok).generate(prompts, SamplingParams(12)), len(prompts))
    assert [a.token_ids for a in answers] == [r["token_ids"] for r in second]
