"""On-policy priming distillation (`primekd distill --on-policy`).

In rounds, composing the existing pieces:

1. **rollout**: the current student answers a slice of the training questions from its bare
   prompt (the prompt `distill` trains under), through the engine: in this process for `hf`
   (the LoRA model being trained), or merged and served for `vllm`;
2. **scoring**: the teacher reads the same question under the priming strategy (ground truth,
   persona, template, prefill) and `score`s the student's answer tokens: top-k + rest mass,
   exactly as a teacher store holds them. Without `--teacher` the teacher is the student's
   own base model without its adapter (self-distillation under privileged context);
3. the round is written as an ordinary teacher store (`target: student`) in
   `rounds/round-NNN/`, and the student **trains** on it with the configured divergence,
   mixed with off-policy rows from `--teacher-store` (`lmbda` is the on-policy share of
   each round's sequences), continuing the same adapter, optimizer and LR schedule.

Each round ends in a Trainer checkpoint and a line in `rounds.json` (with the seconds spent
rolling out, scoring and training). A killed run resumes at the round it was in: rollouts
and scored rows already saved are kept (`rollout.jsonl`, the store's parts), training of an
unfinished round restarts from the previous round's checkpoint, so no row is lost or
trained on twice.
"""

from __future__ import annotations

import math
import os
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from primekd import __version__
from primekd.core.chat import chat_date, encode_prompts, render
from primekd.core.data import Example, load_examples
from primekd.core.errors import PrimekdError
from primekd.core.grading import grade
from primekd.core.io import (
    append_jsonl,
    read_json,
    read_jsonl,
    truncate_torn_tail,
    write_json,
)
from primekd.core.memory import release_memory
from primekd.core.models import default_device, load_tokenizer, resolve, tokenizer_fingerprint
from primekd.distill.compat import check_teacher_compat, same_tokenizer, vocabulary_rows
from primekd.distill.config import DistillConfig, check_config, teacher_options
from primekd.distill.data import Item, build_datasets, student_prompts
from primekd.distill.trainer import (
    SUMMARY_FILE,
    DistillResult,
    KDTrainer,
    build_student,
    check_out,
    claimed,
    kd_trainer,
    mixed_precision,
    run_summary,
    save_final_model,
    trainable_parameters,
    training_arguments,
    write_config,
)
from primekd.engines import EngineSpec, Generation, SamplingParams, TopK, collect
from primekd.engines.hf import SORT_WINDOW_BATCHES, HFEngine
from primekd.evaluate.answer_stop import sampling_options
from primekd.teach import store
from primekd.teach.priming import Strategy, get_strategy
from primekd.teach.spans import decode_text, encode_answer
from primekd.teach.teacher import answer_text

ROUNDS_DIR, ROUNDS_FILE, ROLLOUT_FILE = "rounds", "rounds.json", "rollout.jsonl"
VLLM_ROLLOUT_CHUNK = 512  # requests in flight together: the most a killed round redoes
TARGET = "student"
T = TypeVar("T")


# ---------------------------------------------------------------- the plan


def round_plan(config: DistillConfig, n_questions: int, n_pool: int) -> dict[str, int]:
    """Sizes of every round: questions rolled out, sequences on and off policy, steps."""
    on_questions = round(config.lmbda * config.round_size)
    on = on_questions * config.samples_per_question
    off = config.round_size * config.samples_per_question - on
    if on_questions and not n_questions:
        raise PrimekdError("no questions to roll out: check --data and --limit")
    if off and not n_pool:
        raise PrimekdError("--lmbda below 1 needs off-policy rows: --teacher-store DIR")
    per_step = config.batch_size * config.grad_accum
    steps = max(1, math.ceil((on + off) / per_step))
    return {"on_questions": on_questions, "on_sequences": on, "off_sequences": off,
            "steps_per_round": steps, "max_steps": steps * config.rounds}


def round_slice(values: list[T], r: int, n: int) -> list[T]:
    """Round r's share of `values` (questions in id order, or off-policy items): the next n,
    wrapping around."""
    return [values[(r * n + j) % len(values)] for j in range(n)] if n else []


# ---------------------------------------------------------------- the run


def check_single_process() -> None:
    """On-policy rounds alternate rollouts, scoring and training in one process; under a
    distributed launch every rank would roll out and rank 0 would wait in collectives."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise PrimekdError(f"--on-policy runs in one process, not under accelerate launch or "
                           f"torchrun (WORLD_SIZE={world}): start it as plain `primekd "
                           "distill --on-policy` (it trains on one GPU, --device)")


def distill_on_policy(config: DistillConfig, progress: bool = True) -> DistillResult:
    check_config(config)
    check_single_process()
    out = Path(config.out)
    with claimed(out, config.force):
        return _distill_on_policy(config, out, progress)


def _distill_on_policy(config: DistillConfig, out: Path, progress: bool) -> DistillResult:
    started = time.perf_counter()
    state = _prepare(config, out)
    device = config.device or default_device()
    mixed_precision(config, device)
    strategy = get_strategy(config.strategy, config.strategies_file)
    source = resolve(config.student)
    tokenizer = load_tokenizer(source, padding_side="right")
    examples = _examples(config)
    teacher = _Teacher(config, tokenizer, device)  # refuses an unfit teacher first
    pool = _off_policy_pool(config, tokenizer, teacher.cross)
    plan = round_plan(config, len(examples), len(pool))
    args = training_arguments(replace(config, max_steps=plan["max_steps"], epochs=None,
                                      save_steps=10 ** 9), out, device, progress, False)
    args.ignore_data_skip = True  # each round trains on its own data, from its start
    # placed now: round 0 rolls out before the Trainer would place it
    model = build_student(config, device).to(args.device)
    teacher.model = model
    counts = trainable_parameters(model)
    history: list[dict[str, Any]] | None = None
    first = len(state["rounds"])
    try:
        for r in range(first, config.rounds):
            previous = state["rounds"][-1]["checkpoint"] if state["rounds"] else None
            if previous is not None and r == first:
                _load_adapter(model, previous)  # resumed: roll out with round r's student
            if config.engine == "vllm":
                _make_room(model)
            record = {"round": r}
            questions = round_slice(examples, r, plan["on_questions"])
            round_dir = out / ROUNDS_DIR / f"round-{r:03d}"
            on_items = _on_policy_round(config, model, tokenizer, teacher, strategy,
                                        questions, round_dir, r, record, state["chat_date"])
            items = on_items + round_slice(pool, r, plan["off_sequences"])
            if not items:
                raise PrimekdError(f"round {r} has no training sequences")
            teacher.release()
            model.to(args.device)
            tick = time.perf_counter()
            trainer = _train_round(config, model, args, tokenizer, items, out, previous,
                                   progress, plan["steps_per_round"] * (r + 1), teacher.cross)
            record.update(train_s=round(time.perf_counter() - tick, 3),
                          on_sequences=len(on_items), off_sequences=len(items) - len(on_items),
                          step=trainer.state.global_step,
                          train_tokens=int(trainer.run_totals()[1]),
                          checkpoint=str(Path(args.output_dir) /
                                         f"checkpoint-{trainer.state.global_step}"),
                          store=str(round_dir))
            state["rounds"].append(record)
            if progress:
                _print_round(record)
            if r == config.rounds - 1:  # the adapter and summary before the last record:
                summary = _finish(config, trainer, state, plan, counts, device, out,
                                  source.kind, time.perf_counter() - started)
            history = list(trainer.state.log_history)
            trainer = None  # the next round resumes its optimizer from the checkpoint
            write_json(out / ROUNDS_FILE, state)  # a kill before this redoes round r's training
    finally:
        teacher.close()
    if history is None:  # every round was done before: the adapter is saved
        return DistillResult(out, read_json(out / SUMMARY_FILE), [])
    return DistillResult(out, summary, history)


def _make_room(model: Any) -> None:
    """Before the round's vLLM servers start: the student's weights to the CPU (back for
    training), the last round's trainer (optimizer state, activations) collected and
    PyTorch's cached CUDA blocks returned: vLLM refuses to start on a GPU whose free memory
    is below gpu_memory_utilization x total."""
    model.to("cpu")
    release_memory()


def _print_round(record: dict[str, Any]) -> None:
    accuracy = record.get("student_accuracy")
    print(f"round {record['round']}: {record['on_sequences']} on-policy + "
          f"{record['off_sequences']} off-policy sequences; rollout {record['rollout_s']:.1f} s, "
          f"scoring {record['score_s']:.1f} s, training {record['train_s']:.1f} s"
          + (f"; student accuracy on its rollouts {accuracy:.3f}" if accuracy is not None
             else ""), file=sys.stderr, flush=True)  # progress: stdout is --json's


def _finish(config: DistillConfig, trainer: KDTrainer, state: dict[str, Any],
            plan: dict[str, int], counts: tuple[int, int], device: str, out: Path, kind: str,
            wall: float) -> dict[str, Any]:
    save_final_model(trainer, out, config.student, kind)
    summary = _summary(config, trainer, state, plan, counts, device, wall)
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _prepare(config: DistillConfig, out: Path) -> dict[str, Any]:
    """`rounds.json` of a run being resumed (with --resume), else a fresh state."""
    check_out(config, out, ROUNDS_DIR)
    write_config(config, out)
    if (out / ROUNDS_FILE).exists():
        state = read_json(out / ROUNDS_FILE)
        state.setdefault("chat_date", chat_date())
        return state
    # the teacher's prompts keep the date the run started on (a resumed round too)
    return {"format": "primekd-on-policy-rounds", "chat_date": chat_date(), "rounds": []}


def _examples(config: DistillConfig) -> list[Example]:
    if round(config.lmbda * config.round_size) == 0:
        return []
    examples = sorted(load_examples(config.data or "train", limit=config.limit),
                      key=lambda e: e.id)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise PrimekdError(f"{config.data}: question ids must be unique")
    return examples


def _off_policy_pool(config: DistillConfig, tokenizer: Any, cross: bool) -> list[Item]:
    if not config.teacher_store or config.lmbda >= 1.0:
        return []
    k = store.read_manifest(store.store_directories(config.teacher_store)[0]).get("top_k")
    if config.alpha < 1 and k != config.top_k:
        raise PrimekdError(f"--teacher-store holds the teacher's top-{k}: score the student's "
                           f"rollouts with the same k (--top-k {k})")
    pool = build_datasets(replace(config, data=None, val_size=0), tokenizer)
    if ("cross_tokenizer" in pool.info) != cross:  # one loss trains both kinds of rows
        mine, its = ("another", "the student's") if cross else ("the student's", "another")
        raise PrimekdError(f"--on-policy's teacher has {mine} tokenizer, and --teacher-store "
                           f"{config.teacher_store} was written with {its}: off-policy rows "
                           "must come from a teacher of the on-policy teacher's tokenizer; "
                           "use the store off-policy (drop --on-policy), or --lmbda 1")
    return pool.train


def _load_adapter(model: Any, checkpoint: str) -> None:
    """The LoRA weights of a saved round (the file itself: peft's `load_peft_weights` would
    look for a missing one on the hub)."""
    set_peft_model_state_dict(model, load_file(str(Path(checkpoint) /
                                                   "adapter_model.safetensors")))


# ---------------------------------------------------------------- one round's data


def _on_policy_round(config: DistillConfig, model: Any, tokenizer: Any, teacher: _Teacher,
                     strategy: Strategy, questions: list[Example], round_dir: Path, r: int,
                     record: dict[str, Any], date: str) -> list[Item]:
    """Roll out, score and store round r (resuming what is saved); its training items."""
    if not questions:
        record.update(rollout_s=0.0, score_s=0.0, rollout_tokens=0, student_accuracy=None)
        return []
    units = [(e, s) for e in questions for s in range(config.samples_per_question)]
    with store.locked(round_dir):
        store.clean_temp_files(round_dir)
        tick = time.perf_counter()
        rollouts = _rollouts(config, model, tokenizer, teacher, units, round_dir, r)
        record["rollout_s"] = round(time.perf_counter() - tick, 3)
        tick = time.perf_counter()
        _score(config, tokenizer, teacher, strategy, units, rollouts, round_dir, date)
        record["score_s"] = round(time.perf_counter() - tick, 3)
        manifest = _manifest(config, round_dir, strategy, teacher.tokenizer, len(units), r)
        manifest["chat_date"] = date
        store.write_manifest(round_dir, manifest)
    record.update(rollout_tokens=sum(len(g["token_ids"]) for g in rollouts.values()),
                  student_accuracy=manifest["teacher_accuracy"])
    round_config = replace(config, teacher_store=str(round_dir), data=None, limit=None,
                           val_size=0)
    data = build_datasets(round_config, tokenizer)
    if "cross_tokenizer" in data.info:
        record["cross_tokenizer"] = data.info["cross_tokenizer"]
    return data.train


def _rollouts(config: DistillConfig, model: Any, tokenizer: Any, teacher: _Teacher,
              units: list[tuple[Example, int]], round_dir: Path, r: int
              ) -> dict[tuple[str, int], dict[str, Any]]:
    """The student's answers of this round, appended to rollout.jsonl as they finish."""
    path = round_dir / ROLLOUT_FILE
    done = _read_rollouts(path)
    size = _rollout_chunk(config)
    chunks = [(start, units[start:start + size]) for start in range(0, len(units), size)]
    todo = [(start, chunk) for start, chunk in chunks
            if any((e.id, s) not in done for e, s in chunk)]
    if todo:
        seed = zlib.crc32(f"{config.seed}:on-policy:{r}".encode())
        stop = sampling_options(config.rollout_stop_at_answer)
        sampling = SamplingParams(config.rollout_max_new_tokens, config.rollout_temperature,
                                  1.0, seed, eos_after_cut=bool(stop), **stop)
        engine = teacher.student_engine(model, r)
        for start, chunk in todo:
            prompts = student_prompts(tokenizer, [e.question for e, _ in chunk], config.prompt)
            chunk_sampling = replace(sampling, seed=seed + start)
            for i, generation in engine.generate(prompts, chunk_sampling):
                example, sample = chunk[i]
                if (example.id, sample) not in done:  # saved rows are kept as they are
                    row = _rollout_row(example, sample, generation)
                    append_jsonl(path, [row])
                    done[(example.id, sample)] = row
        teacher.student_done()
    return {(e.id, s): done[(e.id, s)] for e, s in units}


def _rollout_chunk(config: DistillConfig) -> int:
    """Units per generate call. A sampled answer depends on the rest of its call (hf: the
    batch shares one random stream, seeded by its position; vLLM: the request's seed is its
    index), so a resume redoes a partly saved chunk whole, with the same prompts and seed as
    the uninterrupted run, and keeps only its missing answers. For hf a chunk is one sort
    window of HFEngine, which batches it exactly as one call over all units would."""
    if config.engine == "vllm":
        return VLLM_ROLLOUT_CHUNK
    return config.batch_size * 4 * SORT_WINDOW_BATCHES


def _rollout_row(example: Example, sample: int, generation: Generation) -> dict[str, Any]:
    return {"id": example.id, "sample": sample, "text": generation.text,
            "token_ids": list(generation.token_ids), "finish_reason": generation.finish_reason}


def _read_rollouts(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The rollouts saved so far; a torn last line (killed mid-write) is dropped, and that
    rollout redone."""
    truncate_torn_tail(path)  # so the next append starts on a fresh line
    rows = read_jsonl(path) if path.exists() else []
    return {(row["id"], row["sample"]): row for row in rows}


def _score(config: DistillConfig, tokenizer: Any, teacher: _Teacher, strategy: Strategy,
           units: list[tuple[Example, int]], rollouts: dict[tuple[str, int], dict[str, Any]],
           round_dir: Path, date: str) -> None:
    """The primed teacher's top-k at every token of the student's answers, written as parts
    of the round's store (units already written are skipped)."""
    done = store.done_keys(round_dir)
    todo = [u for u in units if (u[0].id, u[1]) not in done]
    empty = [u for u in todo if not rollouts[(u[0].id, u[1])]["token_ids"]]
    todo = [u for u in todo if rollouts[(u[0].id, u[1])]["token_ids"]]
    if empty:  # nothing to score or train on: recorded as done, no row
        store.write_part(round_dir, [], [(e.id, s) for e, s in empty], {"rows": len(empty)})
    if not todo:
        return
    chats = [strategy.render(e.question, e.answer, answer_text(e)) for e, _ in todo]
    texts = [render(teacher.tokenizer, chat, date) for chat in chats]
    prompts = encode_prompts(teacher.tokenizer, texts)
    answers = [teacher.answer(rollouts[(e.id, s)]) for e, s in todo]
    engine = teacher.teacher_engine()
    for start in range(0, len(todo), config.batch_size * 4):
        end = min(start + config.batch_size * 4, len(todo))
        topks = collect(teacher.score(engine, prompts[start:end],
                                      [a.ids for a in answers[start:end]], config.top_k),
                        end - start)
        rows = [_store_row(todo[i], texts[i], rollouts[(todo[i][0].id, todo[i][1])],
                           answers[i], topks[i - start])
                for i in range(start, end)]
        stats = {"rows": len(rows), "kept": len(rows),
                 "correct": sum(r["correct"] for r in rows),
                 "answer_tokens": sum(len(r["token_ids"]) for r in rows)}
        store.write_part(round_dir, rows, [(e.id, s) for e, s in todo[start:end]], stats)


@dataclass
class TeacherAnswer:
    """A rollout as the teacher reads it: its token ids (the student's own, or the rollout's
    text in the teacher's tokens) and, for another tokenizer, that text and every token's end
    in it, which the student's tokens are aligned to (`distill.xtok_data`)."""

    ids: list[int]
    text: str | None = None
    char_ends: list[int] | None = None


def _store_row(unit: tuple[Example, int], teacher_prompt: str, rollout: dict[str, Any],
               answer: TeacherAnswer, topk: TopK) -> dict[str, Any]:
    example, sample = unit
    graded = grade(rollout["text"], example.answer)
    return {"id": example.id, "sample": sample, "question": example.question,
            "reference": example.answer, "gold": example.gold,
            "teacher_prompt": teacher_prompt, "response": rollout["text"],
            "token_ids": answer.ids, "topk_ids": topk.ids.tolist(),
            "topk_logprobs": topk.logprobs.tolist(),
            "finish_reason": rollout["finish_reason"], "extracted": graded.extracted,
            "correct": graded.correct, "answer_text": answer.text,
            "token_char_ends": answer.char_ends}


def _manifest(config: DistillConfig, round_dir: Path, strategy: Strategy, tokenizer: Any,
              expected: int, r: int) -> dict[str, Any]:
    totals = store.summed_stats(round_dir)
    rows = int(totals.get("kept", 0))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    params = {"teacher": config.teacher or config.student, "student": config.student,
              "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),  # the store's tokens
              "strategy": strategy.to_dict(), "target": TARGET, "round": r,
              "generation": {"samples_per_question": config.samples_per_question,
                             "temperature": config.rollout_temperature,
                             "max_new_tokens": config.rollout_max_new_tokens,
                             "stop_at_answer": config.rollout_stop_at_answer,
                             "seed": config.seed},
              "top_k": config.top_k, "keep": "all", "engine": config.engine, "shard": None}
    return {
        "format": store.FORMAT, "format_version": store.FORMAT_VERSION,
        **{key: params[key] for key in ("teacher", "tokenizer_fingerprint", "strategy", "target",
                                        "generation", "top_k", "keep", "engine", "shard")},
        "logprobs": "full-vocabulary log-softmax at temperature 1 of the teacher (under the "
                    "priming prompt) over the student's answer; top_k per token",
        "columns": list(store.COLUMNS),
        "counts": {"questions": expected // config.samples_per_question,
                   "expected_rows": expected, "rows": rows, "kept": rows,
                   "correct": int(totals.get("correct", 0))},
        # the graded answers are the student's: "teacher_accuracy" of a target-student store
        # is the student's accuracy on this round's rollouts
        "teacher_accuracy": totals.get("correct", 0) / rows if rows else 0.0,
        "mean_answer_tokens": totals.get("answer_tokens", 0) / rows if rows else None,
        "complete": True, "created_at": now, "updated_at": now, "tool_version": __version__,
        "params": params,
    }


# ---------------------------------------------------------------- engines


class _Teacher:
    """The engines of a run: the student's rollouts and the teacher's scoring, for `hf` in
    this process (self-distillation scores with the student's adapter switched off), for
    `vllm` through one server at a time (stopped before training and on exit)."""

    def __init__(self, config: DistillConfig, tokenizer: Any, device: str,
                 model: Any = None):
        self.config, self.model, self.device = config, model, device
        self.self_teacher = config.teacher in (None, config.student)
        self.student_tokenizer = tokenizer
        self.tokenizer = tokenizer if self.self_teacher else \
            load_tokenizer(resolve(config.teacher))
        self.cross = not same_tokenizer(tokenizer, self.tokenizer)
        if not self.self_teacher and not self.cross:
            check_teacher_compat(config.student, config.teacher,
                                 vocabulary_rows(resolve(config.student)),
                                 vocabulary_rows(resolve(config.teacher)))
        self._hf_teacher: Any = None
        self._merged: str | None = None
        self.spec = EngineSpec(config.engine, None, dict(config.engine_options or {}))
        self.teacher_spec = EngineSpec(config.engine, None, teacher_options(config))

    def student_engine(self, model: Any, r: int) -> Any:
        if self.config.engine == "vllm":
            from primekd.engines import get_engine

            adapter = Path(self.config.out) / ROUNDS_DIR / f"round-{r:03d}" / "student"
            if not (adapter / "adapter_config.json").exists():
                model.save_pretrained(str(adapter))
            engine = get_engine(self.config.student, self.spec, adapter=str(adapter))
            if not self.spec.options.get("lora"):
                from primekd.engines.vllm import merged_model

                self._merged = merged_model(resolve(self.config.student), str(adapter))
            return engine
        model.eval()
        model.config.use_cache = True
        return HFEngine(model, self.student_tokenizer, batch_size=self.config.batch_size * 4)

    def _drop_merged(self) -> None:
        """The round's merged student (a full model copy in primekd's cache) is used once."""
        if self._merged is not None:
            import shutil

            shutil.rmtree(self._merged, ignore_errors=True)
            self._merged = None

    def student_done(self) -> None:
        self.model.train()
        self.model.config.use_cache = False

    def teacher_engine(self) -> Any:
        if self.config.engine == "vllm":
            from primekd.engines import get_engine

            teacher = self.config.teacher or self.config.student
            engine = get_engine(teacher, self.teacher_spec)  # the student's is stopped now
            self._drop_merged()
            return engine
        if self.self_teacher:
            return HFEngine(self.model, self.tokenizer, batch_size=self.config.batch_size * 4)
        if self._hf_teacher is None:
            self._hf_teacher = HFEngine.load(self.config.teacher, device=self.device,
                                             batch_size=self.config.batch_size * 4,
                                             **self.teacher_spec.options)
        return self._hf_teacher

    def answer(self, rollout: dict[str, Any]) -> TeacherAnswer:
        """The rollout in the teacher's tokens: the student's ids for one tokenizer; for
        another, the rollout's text encoded by the teacher (its EOS after a finished answer,
        as the student's text gets the student's EOS), with the spans that align it back."""
        if not self.cross:
            return TeacherAnswer(list(rollout["token_ids"]))
        text = decode_text(self.student_tokenizer, rollout["token_ids"])
        ids, ends = encode_answer(self.tokenizer, text, rollout["finish_reason"] != "length")
        return TeacherAnswer(ids, text, ends)

    def score(self, engine: Any, prompts: list[list[int]], answers: list[list[int]], k: int
              ) -> Any:
        """The scores as (index, TopK) pairs; the self-teacher is the base model."""
        with self._base_model():
            return list(engine.score(prompts, answers, k))

    @contextmanager
    def _base_model(self) -> Any:
        if self.config.engine != "hf" or not self.self_teacher:
            yield
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self.model.train(was_training)

    def release(self) -> None:
        """Free the server's memory before training."""
        if self.config.engine == "vllm":
            from primekd.engines.vllm import shutdown

            shutdown()

    def close(self) -> None:
        self.release()
        self._drop_merged()


# ---------------------------------------------------------------- training


class _RoundEnd(TrainerCallback):
    """Stop (and checkpoint) at the end of the round: one pass over its sequences."""

    def __init__(self, last_step: int):
        self.last_step = last_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= self.last_step:
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_training_stop = True
        # at the round's last step `on_step_end` has saved it already: not twice
        control.should_save = state.global_step < self.last_step
        return control


def _train_round(config: DistillConfig, model: Any, args: Any, tokenizer: Any,
                 items: list[Item], out: Path, previous: str | None, progress: bool,
                 last_step: int, cross_tokenizer: bool) -> KDTrainer:
    trainer = kd_trainer(config, model, args, tokenizer, out, items,
                         callbacks=[_RoundEnd(last_step)], progress=progress,
                         cross_tokenizer=cross_tokenizer)
    trainer.train(resume_from_checkpoint=previous)
    return trainer


def _summary(config: DistillConfig, trainer: KDTrainer, state: dict[str, Any],
             plan: dict[str, int], counts: tuple[int, int], device: str, wall: float
             ) -> dict[str, Any]:
    rounds = state["rounds"]
    cost = {key: round(sum(r.get(key) or 0.0 for r in rounds), 3)
            for key in ("rollout_s", "score_s", "train_s")}
    data = {"source": "on_policy", "teacher_store": config.teacher_store,
            "white_box": config.alpha < 1}
    summary = run_summary(config, trainer, counts, device, white_box=config.alpha < 1,
                          train_time=cost["train_s"], untimed_tokens=0, wall=wall, data=data)
    summary["on_policy"] = {"teacher": config.teacher or config.student,
                            "strategy": config.strategy, "lmbda": config.lmbda,
                            "rounds": rounds, "plan": plan, "cost_s": cost,
                            "engine": config.engine}
    return summary
