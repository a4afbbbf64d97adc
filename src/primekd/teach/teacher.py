"""`teach`: a teacher answers the transfer set under a priming strategy, into a teacher store.

Every (question, sample) unit's primed prompt goes to the engine (`primekd.engines`), which
returns the answer tokens with the top-k of the T=1 log-softmax at each of them (generated
answers: `generate` with log-probs; `target="reference"`: `score` on the reference solution).
Units are graded as they finish and written `batch_size` at a time as one part, or sooner
when `PART_INTERVAL_S` passes first, so a killed teacher loses at most that much work.
The store keeps the bare question; the priming lives only in `teacher_prompt` and the
manifest. With a prefill, the prefill is part of the prompt and `response`/`token_ids` hold
what the teacher wrote after it (the student, seeing the bare question, learns that).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from primekd import __version__
from primekd.core import diskspace, outdir, validate
from primekd.core.chat import chat_date, encode_prompts, render
from primekd.core.data import (
    Example,
    load_examples,
    offset_field,
    resolve_data_path,
    sample_field,
    strip_calculator,
)
from primekd.core.errors import PrimekdError
from primekd.core.grading import (
    extractor_field,
    grade,
    grade_fields,
    lenient_field,
    looping,
    working_text,
)
from primekd.core.models import load_tokenizer, resolve, tokenizer_fingerprint
from primekd.core.options import check, command_line, force_field, option
from primekd.core.progress import progress_bar
from primekd.engines import (
    EngineSpec,
    SamplingParams,
    TopK,
    base_url_field,
    device_field,
    engine_field,
    engine_options_field,
    get_engine,
    stop_at_answer_field,
)
from primekd.evaluate import answer_stop
from primekd.teach import store
from primekd.teach.priming import Strategy, get_strategy
from primekd.teach.spans import char_ends

TARGETS = ("generated", "reference")
KEEP = ("all", "correct")


@dataclass
class TeachConfig:
    """Every option of `primekd teach`."""

    teacher: str = option(help="Teacher model: a model alias (the bundled "
                          "smollm2-135m-instruct; `primekd models` lists the others), a HF "
                          "directory, a .gguf file or a hub id.", flags=("--teacher", "-m"),
                          set_by="experiment")
    out: str | Path = option(help="Store directory to create, or to resume when it holds a "
                             "store made with the same parameters.", flags=("--out", "-o"),
                             cli_type=Path, set_by="experiment")
    strategy: str = option("none", "Priming strategy name (see --list-strategies).",
                           flags=("--strategy", "-s"), set_by="experiment")
    strategies_file: str | Path | None = option(
        None, "YAML file with more strategies (Jinja2 templates over question, reference, "
        "answer).", flags=("--strategies",), cli_type=Path, set_by="experiment")
    data: str = option("train", "Transfer set: train, test, test_socratic, or a JSONL file "
                       "with question and answer.", set_by="experiment")
    limit: int | None = option(None, "Use at most N questions.", set_by="experiment", ge=1)
    offset: int = offset_field()
    sample: int | None = sample_field()
    seed: int = option(0, "Seed for --sample and for sampling.")
    samples_per_question: int = option(1, "Answers per question (needs --temperature > 0 when "
                                       "above 1).", flags=("--samples-per-question", "-k"), ge=1)
    temperature: float = option(0.0, "Sampling temperature; 0 is greedy. Stored log-probs "
                                "are always at temperature 1.", flags=("--temperature", "-t"), ge=0)
    max_new_tokens: int = option(256, "Longest answer, in tokens.", ge=1)
    top_k: int = option(20, "Teacher log-probs kept per answer token.", ge=1)
    target: str = option("generated", "generated: the teacher's own answers; reference: the "
                         "teacher reads the reference solution (teacher forcing).", choices=TARGETS)
    keep: str = option("all", "all, or correct: keep only correct answers (rejection "
                       "sampling; accuracy is still over all).", choices=KEEP)
    shard: str | None = option(None, "i/n: take every n-th question from the i-th (0-based), "
                               "to split the set across n processes, each with its own --out.",
                               set_by="experiment")
    batch_size: int = option(8, "Answers per part: every batch_size finished answers are "
                             "saved as one part, and whatever has finished at least every "
                             "10 minutes (and the hf engine's batch).",
                             flags=("--batch-size", "-b"), ge=1)
    device: str | None = device_field()
    extractor: str = extractor_field()
    engine: str = engine_field()
    base_url: str | None = base_url_field()
    engine_options: dict[str, Any] = engine_options_field()
    lenient: bool = lenient_field()
    stop_at_answer: bool = stop_at_answer_field()
    force: bool = force_field()

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(self.engine, self.base_url, dict(self.engine_options))


@dataclass(frozen=True)
class Unit:
    example: Example
    sample: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.example.id, self.sample)


def teach(config: TeachConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a teacher into `config.out`; return the final manifest."""
    started = time.perf_counter()
    check_config(config)
    strategy = get_strategy(config.strategy, config.strategies_file)
    examples = select_examples(config)
    source = resolve(config.teacher)
    tokenizer = load_tokenizer(source)
    _check_fits(config, strategy, examples, source, tokenizer)
    params = identity(config, strategy, tokenizer)
    out = Path(config.out)
    units = [Unit(e, s) for e in examples for s in range(config.samples_per_question)]
    with diskspace.guard(out, store_need(config, units, out, tokenizer)), \
            outdir.claimed(out, "teach", config.force):
        existing = _existing_manifest(out, params)
        date = _chat_date(existing)
        store.clean_temp_files(out)
        done = store.done_keys(out)
        totals = store.summed_stats(out)  # then kept up to date here, not re-read per batch
        todo = [u for u in units if u.key not in done]

        def save() -> dict[str, Any]:
            manifest = _manifest(config, params, existing, totals, len(examples), len(units),
                                 started)
            manifest["chat_date"] = date
            store.write_manifest(out, manifest)
            return manifest

        save()
        if todo:
            hf = config.engine == "hf"
            engine = get_engine(config.teacher, config.engine_spec(), device=config.device,
                                batch_size=config.batch_size if hf else None)
            try:
                with _progress_bar(progress, len(units), len(units) - len(todo)) as advance:
                    for batch, rows, stats in run_units(engine, config, strategy, todo, date):
                        kept = [r for r in rows if config.keep == "all" or r["correct"]]
                        store.write_part(out, kept, [u.key for u in batch], stats)
                        for key, value in stats.items():
                            totals[key] = totals.get(key, 0) + value
                        save()
                        advance(len(batch))
            finally:
                engine.close()
        return save()


# Store bytes per answer token: 7 per top-k entry (int32 id + float32 log-prob, zstd) and 15
# for the token and its share of the row (docs/teach.md: 155 at top-20, bench/teacher_store.py),
# plus 8 for the cross-tokenizer columns (its characters of answer_text, its int32 char end)
BYTES_PER_TOPK, BYTES_PER_TOKEN, BYTES_PER_ROW = 7, 23, 1024


def store_need(config: TeachConfig, units: Sequence[Unit], out: Path, tokenizer: Any
               ) -> diskspace.Need:
    """The store's size still to write: answers x tokens x bytes per token. Answer lengths
    are the store's own mean when resuming, the references' for a reference target, else
    up to --max-new-tokens (the floor, below which it is refused, assumes a quarter)."""
    done = store.done_keys(out) if (out / store.MANIFEST).exists() else set()
    todo = [u for u in units if u.key not in done]
    stats = store.summed_stats(out) if done else {}
    per_token = config.top_k * BYTES_PER_TOPK + BYTES_PER_TOKEN
    if config.target == "reference":
        tokens = sum(len(reference_tokens(tokenizer, u.example)) for u in todo)
        low = high = tokens * per_token + len(todo) * BYTES_PER_ROW
        length = "reference"
    elif stats.get("rows"):
        mean = stats.get("answer_tokens", 0) / stats["rows"]
        low = high = round(len(todo) * (mean * per_token + BYTES_PER_ROW))
        length = f"~{mean:.0f}"
    else:
        high = len(todo) * (config.max_new_tokens * per_token + BYTES_PER_ROW)
        low = len(todo) * (config.max_new_tokens // 4 * per_token + BYTES_PER_ROW)
        length = f"up to {config.max_new_tokens}"
    if config.keep == "correct":
        low = 0  # how many answers it keeps is not known before they are graded
    return diskspace.Need(high, low, f"teach ({len(todo)} answers x {length} tokens x "
                          f"top-{config.top_k})")


def _check_fits(config: TeachConfig, strategy: Strategy, examples: Sequence[Example],
                source: Any, tokenizer: Any) -> None:
    """--top-k within the vocabulary, and every primed prompt (plus the answer budget)
    within the teacher's context, checked before the model loads or a file is written."""
    if config.top_k > len(tokenizer):
        raise PrimekdError(f"--top-k {config.top_k} exceeds the teacher's vocabulary of "
                           f"{len(tokenizer)} tokens")
    texts = [render(tokenizer, strategy.render(e.question, e.answer, answer_text(e)))
             for e in examples]
    budget = config.max_new_tokens if config.target == "generated" else 0
    validate.prompts_fit(tokenizer, texts, validate.model_context(source.path), budget,
                         "the primed prompt of question")


# ---------------------------------------------------------------- the units


PART_INTERVAL_S = 600.0  # the longest a finished answer waits to be saved


def run_units(
    engine: Any, config: TeachConfig, strategy: Strategy, units: Sequence[Unit],
    date_string: str | None = None,
) -> Iterator[tuple[list[Unit], list[dict[str, Any]], dict[str, Any]]]:
    """Answer and grade `units` through the engine; yield (units, rows, counts) for every
    `batch_size` units finished, or for what has finished once `PART_INTERVAL_S` has passed
    since the last part (rows in unit order within a part), then the remainder. The
    interval matters where many answers are in flight (vLLM): they finish in bursts, long
    after they started. `date_string`: the store's pinned date for templates that insert
    today's."""
    tokenizer = engine.tokenizer
    chats = [strategy.render(u.example.question, u.example.answer, answer_text(u.example))
             for u in units]
    texts = [render(tokenizer, chat, date_string) for chat in chats]
    prompts = encode_prompts(tokenizer, texts)
    if config.target == "generated":
        seed = zlib.crc32(f"{config.seed}:{units[0].example.id}:{units[0].sample}".encode())
        # --stop-at-answer: the engines' `cut` hook with grading's answer-line rule; the cut
        # answer ends with EOS, so a student trained on it learns to stop there
        sampling = SamplingParams(config.max_new_tokens, config.temperature, 1.0, seed,
                                  logprobs=config.top_k, eos_after_cut=True,
                                  **answer_stop.sampling_options(config.stop_at_answer))
        answers = ((i, g.token_ids, g.finish_reason, g.topk)
                   for i, g in engine.generate(prompts, sampling))
    else:
        references = [reference_tokens(tokenizer, u.example) for u in units]
        answers = ((i, references[i], "reference", topk)
                   for i, topk in engine.score(prompts, references, config.top_k))
    finished: list[tuple[int, dict[str, Any]]] = []
    started = time.perf_counter()
    for i, token_ids, reason, topk in answers:
        finished.append((i, _row(tokenizer, units[i], chats[i], texts[i], token_ids, reason,
                                 topk, config)))
        if (len(finished) == config.batch_size
                or time.perf_counter() - started >= PART_INTERVAL_S):
            yield _part(finished, units, config, started, tokenizer)
            finished, started = [], time.perf_counter()
    if finished:
        yield _part(finished, units, config, started, tokenizer)


def _part(finished: list[tuple[int, dict[str, Any]]], units: Sequence[Unit],
          config: TeachConfig, started: float, tokenizer: Any
          ) -> tuple[list[Unit], list[dict[str, Any]], dict[str, Any]]:
    finished = sorted(finished, key=lambda pair: pair[0])
    rows = [row for _, row in finished]
    seconds = time.perf_counter() - started
    stats = _batch_stats(rows, config, seconds, seconds)
    stats["restated"] = restated_count(rows, tokenizer)
    stats["looping"] = sum(r["finish_reason"] == "length" and looping(r["response"])
                           for r in rows)
    return [units[i] for i, _ in finished], rows, stats


def _row(tokenizer: Any, unit: Unit, chat: Any, text: str, answer: list[int], reason: str,
         topk: TopK | None, config: TeachConfig) -> dict[str, Any]:
    response = tokenizer.decode(answer, skip_special_tokens=True)
    answer_text, ends = char_ends(tokenizer, answer)  # `text` is the teacher's prompt
    graded = grade(chat.prefill + response, unit.example.answer, config.extractor,
                   None if reason == "reference" else reason, config.lenient)
    return {
        "id": unit.example.id,
        "sample": unit.sample,
        "question": unit.example.question,
        "reference": unit.example.answer,
        "gold": unit.example.gold,
        "teacher_prompt": text,
        "response": response,
        "token_ids": answer,
        "topk_ids": topk.ids.tolist() if topk is not None else [],
        "topk_logprobs": topk.logprobs.tolist() if topk is not None else [],
        "finish_reason": reason,
        **grade_fields(graded),
        "answer_text": answer_text,
        "token_char_ends": ends,
    }


# An answer that states its final answer with fewer working tokens than this (outside its
# answer line) restates the answer without working it out: the failure a teacher shown the
# ground truth is prone to. No GSM8K train reference solution has fewer than 19 SmolLM2
# tokens of working (1st percentile 27, median 79, calculator annotations removed), and one
# step in words ("She has 16 - 3 - 4 = 9 eggs left.") takes 17.
RESTATE_MAX_TOKENS = 16


def working_tokens(response: str, tokenizer: Any) -> int | None:
    """Tokens of an answer's working (outside its final-answer line); None without one."""
    working = working_text(response)
    if working is None:
        return None
    return len(tokenizer(working, add_special_tokens=False)["input_ids"]) if working else 0


def restated_count(rows: Sequence[dict[str, Any]], tokenizer: Any) -> int:
    """Answers that state a final answer with fewer than `RESTATE_MAX_TOKENS` tokens of
    working (generated answers only: a reference target is the reference's own text)."""
    count = 0
    for row in rows:
        if row.get("finish_reason") == "reference":
            continue
        n = working_tokens(row["response"], tokenizer)
        count += n is not None and n < RESTATE_MAX_TOKENS
    return count


def _batch_stats(rows: list[dict[str, Any]], config: TeachConfig, generation_s: float,
                 batch_s: float) -> dict[str, Any]:
    tokens = sum(len(r["token_ids"]) for r in rows)
    kept = [r for r in rows if config.keep == "all" or r["correct"]]
    return {
        "rows": len(rows),
        "kept": len(kept),
        "correct": sum(r["correct"] for r in rows),
        "correct_strict": sum(r["correct_strict"] for r in rows),
        "correct_flexible": sum(r["correct_flexible"] for r in rows),
        "truncated": sum(r["finish_reason"] == "length" for r in rows),
        "no_number": sum(r["extracted"] is None for r in rows),
        "answer_tokens": tokens,
        "kept_answer_tokens": sum(len(r["token_ids"]) for r in kept),
        "generated_tokens": tokens if config.target == "generated" else 0,
        "generation_seconds": generation_s if config.target == "generated" else 0.0,
        "seconds": batch_s,
    }


def answer_text(example: Example) -> str:
    """The gold answer as the reference writes it (after `####`), for the `answer` variable."""
    if "####" in example.answer:
        return example.answer.rsplit("####", 1)[-1].strip()
    if example.gold is not None and float(example.gold).is_integer():
        return str(int(example.gold))
    return example.answer.strip()


def reference_tokens(tokenizer: Any, example: Example) -> list[int]:
    """The reference solution as the teacher reads it: calculator annotations removed
    (GSM8K's `<<48/2=24>>` is dataset markup, not language), ending with the EOS token so the
    student learns where an answer stops."""
    text = strip_calculator(example.answer).strip()
    if not text:
        raise PrimekdError(f"question {example.id} has an empty reference solution")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


# ---------------------------------------------------------------- setup


def check_config(config: TeachConfig) -> None:
    def bad(message: str) -> None:
        raise PrimekdError(message)

    check(config)  # types, ranges and choices, as the fields declare them
    validate.device(config.device)
    config.engine_spec().check()
    if config.target == "reference" and config.samples_per_question > 1:
        bad("--target reference scores the one reference solution: "
            "use --samples-per-question 1")
    if config.samples_per_question > 1 and config.temperature <= 0:
        bad("several samples per question need sampling: set --temperature above 0 (e.g. 0.7)")
    parse_shard(config.shard)


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """`"i/n"` -> (i, n), 0 <= i < n; None for no sharding."""
    if shard is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise PrimekdError(
            f"--shard {shard!r} is not i/n with 0 <= i < n (e.g. 0/4, 1/4, 2/4, 3/4)"
        )
    return int(match.group(1)), int(match.group(2))


def select_examples(config: TeachConfig) -> list[Example]:
    """The questions of this run, in stable id order; with a shard, every n-th of them."""
    examples = load_examples(config.data, limit=config.limit, offset=config.offset,
                             sample=config.sample, seed=config.seed)
    examples = sorted(examples, key=lambda e: e.id)
    repeated = sorted(i for i, n in Counter(e.id for e in examples).items() if n > 1)
    if repeated:
        raise PrimekdError(f"{config.data}: question id {repeated[0]!r} appears more than "
                           f"once ({len(repeated)} repeated ids); ids must be unique, a store "
                           "keys its rows by (id, sample)")
    shard = parse_shard(config.shard)
    if shard is not None:
        examples = examples[shard[0]::shard[1]]
        if not examples:
            raise PrimekdError(f"shard {config.shard} selects no questions; use fewer shards")
    return examples


def identity(config: TeachConfig, strategy: Strategy, tokenizer: Any) -> dict[str, Any]:
    """Everything that decides the store's content: a rerun must match it to resume."""
    data_path, _ = resolve_data_path(config.data)
    generated = config.target == "generated"
    return {
        "teacher": config.teacher,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "strategy": strategy.to_dict(),
        "target": config.target,
        "data": {
            "spec": config.data,
            "sha256": hashlib.sha256(data_path.read_bytes()).hexdigest()[:16],
            "limit": config.limit,
            "offset": config.offset,
            "sample": config.sample,
            "seed": config.seed,
        },
        "generation": {
            "samples_per_question": config.samples_per_question,
            "temperature": config.temperature if generated else None,
            "max_new_tokens": config.max_new_tokens if generated else None,
            "seed": config.seed,
            # only when set, so stores written before the option still resume
            **({"stop_at_answer": True} if config.stop_at_answer and generated else {}),
        },
        "top_k": config.top_k,
        "keep": config.keep,
        "extractor": config.extractor,
        **({"grading": "lenient"} if config.lenient else {}),
        "engine": config.engine,
        "shard": _shard_dict(config.shard),
    }


def _shard_dict(shard: str | None) -> dict[str, int] | None:
    parsed = parse_shard(shard)
    return None if parsed is None else {"index": parsed[0], "count": parsed[1]}


def _chat_date(existing: dict[str, Any] | None) -> str:
    """The date chat templates see: the store's own (a resume on another day keeps it),
    else the day the store was created, else today."""
    if existing and existing.get("chat_date"):
        return existing["chat_date"]
    if existing and existing.get("created_at"):
        return chat_date(datetime.fromisoformat(existing["created_at"]))
    return chat_date()


def _existing_manifest(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a store being resumed; refuses a directory made differently."""
    if (out / store.MANIFEST).exists():
        manifest = store.read_manifest(out)
        old = dict(manifest["params"])
        if "backend" in old:  # stores made before the engines layer
            old["engine"] = old.pop("backend")
        changes = store.identity_changes(old, params)
        if changes:
            raise PrimekdError(
                f"{out} holds a teacher store made with different parameters "
                f"({'; '.join(changes)}); rerun with the original parameters to resume, "
                "or choose a new --out"
            )
        return manifest
    strays = [p.name for p in out.iterdir()
              if p.name not in (".lock", outdir.MARKER) and outdir.is_ours(p.name, "teach")]
    if strays:
        raise PrimekdError(f"{out} is not empty and holds no teacher store "
                           f"({', '.join(sorted(strays)[:3])}...); choose a new --out")
    return None


def _manifest(
    config: TeachConfig,
    params: dict[str, Any],
    existing: dict[str, Any] | None,
    totals: dict[str, float],
    questions: int,
    expected_rows: int,
    started: float,
) -> dict[str, Any]:
    rows = int(totals.get("rows", 0))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    generated = config.target == "generated"
    return {
        "format": store.FORMAT,
        "format_version": store.FORMAT_VERSION,
        "teacher": params["teacher"],
        "tokenizer_fingerprint": params["tokenizer_fingerprint"],
        "strategy": params["strategy"],
        "target": params["target"],
        "generation": params["generation"],
        "top_k": params["top_k"],
        "keep": params["keep"],
        "engine": params["engine"],
        "shard": params["shard"],
        "logprobs": "full-vocabulary log-softmax at temperature 1 of the teacher-forced "
                    "answer; top_k per answer token, not renormalised",
        "columns": list(store.COLUMNS),
        "counts": {
            "questions": questions,
            "expected_rows": expected_rows,
            "rows": rows,
            "kept": int(totals.get("kept", 0)),
            "correct": int(totals.get("correct", 0)),
        },
        "teacher_accuracy": totals["correct"] / rows if rows and generated else None,
        "grading": "lenient" if config.lenient else "default",
        "teacher_accuracy_strict": _share(totals, "correct_strict", rows, generated),
        "teacher_accuracy_flexible": _share(totals, "correct_flexible", rows, generated),
        "truncated": int(totals.get("truncated", 0)),
        "truncation_rate": _share(totals, "truncated", rows, generated),
        "no_number": int(totals.get("no_number", 0)),
        "restated": int(totals["restated"]) if "restated" in totals else None,
        "looping": int(totals["looping"]) if "looping" in totals else None,
        "restated_rate": _share(totals, "restated", rows, generated),
        "restate_max_tokens": RESTATE_MAX_TOKENS,
        "mean_answer_tokens": totals["answer_tokens"] / rows if rows else None,
        "compute_seconds": round(totals.get("seconds", 0.0), 3),
        "generation_tokens_per_s": _rate(totals, "generated_tokens", "generation_seconds"),
        "tokens_per_s": _rate(totals, "answer_tokens", "seconds"),
        "wall_time_s": round(time.perf_counter() - started, 3),  # of the latest invocation
        "batch_size": config.batch_size,
        "complete": rows == expected_rows,
        "command": command_line(config, "teach"),  # the rerun that finishes or resumes it
        "created_at": existing["created_at"] if existing else now,
        "updated_at": now,
        "tool_version": __version__,
        "params": params,
        "params_hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest(),
    }


def _share(totals: dict[str, float], key: str, rows: int, generated: bool) -> float | None:
    """A count over the rows as a fraction; None for reference targets or stores written
    before the count was kept."""
    if not rows or not generated or key not in totals:
        return None
    return totals[key] / rows


def _rate(totals: dict[str, float], tokens: str, seconds: str) -> float | None:
    return round(totals[tokens] / totals[seconds], 2) if totals.get(seconds) else None


@contextmanager
def _progress_bar(enabled: bool, total: int, completed: int) -> Iterator[Any]:
    """Yields `advance(n)`; a resumed run starts the bar at what is already done."""
    with progress_bar(enabled) as bar:
        task = bar.add_task("teacher", total=total, completed=completed)
        yield lambda n: bar.advance(task, n)
