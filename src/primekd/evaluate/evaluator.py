"""Evaluate a model (plus adapter) on GSM8K or any question/answer JSONL.

`evaluate(EvalConfig(...))` generates answers batch by batch, grades them, and keeps the
output directory resumable:

- `eval_config.json`: the parameters that decide the answers (model, adapter, data,
  prompt, generation), written before the first batch. A rerun with different ones is
  refused, so one directory never mixes two setups.
- `results.jsonl`: one row per question, appended and fsync'd after every batch; a rerun
  skips ids already there (a torn last line from a kill is dropped). At the end it is
  rewritten in data order and regraded with the chosen extractor.
- `summary.json`: accuracy over every row in `results.jsonl`, rewritten at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primekd import __version__
from primekd.core import diskspace, outdir, validate
from primekd.core.chat import STUDENT_CHAT_DATE, render
from primekd.core.data import (
    BUNDLED_SPLITS,
    Example,
    load_examples,
    offset_field,
    resolve_data_path,
    sample_field,
)
from primekd.core.errors import PrimekdError
from primekd.core.grading import (
    extractor_field,
    grade,
    grade_fields,
    lenient_field,
    summarize_grades,
)
from primekd.core.io import (
    append_jsonl,
    atomic_write_text,
    read_json,
    read_jsonl,
    truncate_torn_tail,
    write_json,
)
from primekd.core.models import (
    BUNDLED_ALIAS,
    adapter_hash,
    load_tokenizer,
    resolve,
    tokenizer_fingerprint,
)
from primekd.core.options import force_field, option
from primekd.core.progress import progress_bar
from primekd.core.validate import model_context, prompts_fit
from primekd.engines import (
    EngineSpec,
    Generation,
    SamplingParams,
    base_url_field,
    device_field,
    encode_chats,
    engine_field,
    engine_options_field,
    get_engine,
    stop_at_answer_field,
)
from primekd.evaluate import answer_stop
from primekd.evaluate.prompts import PromptTemplate, load_template

RESULTS, SUMMARY, CONFIG = "results.jsonl", "summary.json", "eval_config.json"


@dataclass
class EvalConfig:
    """Every option of `primekd eval`."""

    model: str = option(help=f"Model: a model alias (the bundled {BUNDLED_ALIAS!r}; "
                        "`primekd models` lists the others), a local Hugging Face directory, a "
                        ".gguf file, or a hub id (needs the hub to be reachable).",
                        flags=("--model", "-m"), set_by="experiment")
    out: str | Path = option(help="Output directory for results.jsonl, summary.json and "
                             "eval_config.json. Rerunning into it resumes; other "
                             "model/prompt/generation settings are refused.",
                             flags=("--out", "-o"), cli_type=Path, set_by="experiment")
    adapter: str | None = option(None, "A PEFT (LoRA) adapter directory to apply to the "
                                 "model.", set_by="experiment")
    data: str = option("test", "Questions: a bundled GSM8K split (test, train, test_socratic) "
                       "or a JSONL file with `question` and `answer` (solution ending `#### N`, "
                       "or a bare number) per row.", set_by="experiment")
    limit: int | None = option(None, "Evaluate at most this many questions (default: all).",
                               set_by="experiment", ge=1)
    offset: int = offset_field()
    sample: int | None = sample_field()
    seed: int = option(0, "Seed for --sample, and for sampling when --temperature > 0.")
    batch_size: int | None = option(
        None, "hf: questions generated together (default: 16 on CPU, 64 on GPU; larger is "
        "faster until memory runs out). vllm: requests in flight (default 64). Every answer "
        "is saved as it finishes.", flags=("--batch-size", "-b"), ge=1)
    max_new_tokens: int = option(256, "Longest answer in tokens; longer answers are cut "
                                 "(finish_reason `length`).", ge=1)
    temperature: float = option(0.0, "Sampling temperature; 0 is greedy decoding.", ge=0)
    top_p: float = option(1.0, "Nucleus sampling threshold (only with --temperature > 0).",
                          gt=0, le=1)
    prompt: str | None = option(None, "Custom prompt template (the user turn), as text or a "
                                "path to a file; a Jinja template, `{{ question }}` marks where "
                                "the question goes. Default: zero-shot, step by step, ending "
                                "with 'The answer is N'.")
    few_shot: int = option(0, "Put this many worked GSM8K train solutions before the prompt "
                           "(0: zero-shot).", ge=0)
    extractor: str = extractor_field()
    device: str | None = device_field()
    engine: str = engine_field()
    base_url: str | None = base_url_field()
    engine_options: dict[str, Any] = engine_options_field()
    lenient: bool = lenient_field()
    stop_at_answer: bool = stop_at_answer_field()
    force: bool = force_field()

    def sampling(self, stop: tuple[str, ...] = ()) -> SamplingParams:
        # --stop-at-answer: the engines' `cut` hook with grading's answer-line rule
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.seed, stop,
                              **answer_stop.sampling_options(self.stop_at_answer))

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(self.engine, self.base_url, dict(self.engine_options))


def evaluate(config: EvalConfig, progress: bool = True, loaded: tuple[Any, Any] | None = None,
             ) -> dict[str, Any]:
    """Run (or resume) an evaluation and return the summary that is written to summary.json.

    `loaded` is an already loaded (model, tokenizer) for `config.model`, to skip loading
    (hf engine).
    """
    started = time.perf_counter()
    validate.check_eval(config)  # every field as declared: --extractor among EXTRACTORS
    config.sampling().validate()
    config.engine_spec().check()
    template = load_template(config.prompt, config.few_shot)
    examples = load_examples(config.data, config.limit, config.offset, config.sample, config.seed)
    _check_unique_ids(examples, config.data)
    if loaded is None:
        _check_model(config)  # before claiming the directory for a model that cannot load
    _check_prompts_fit(config, template, examples, loaded)
    out = Path(config.out)
    with diskspace.guard(out, results_need(config, examples, out)), \
            outdir.claimed(out, "eval", config.force):
        return _run(config, template, examples, out, progress, loaded, started)


BYTES_PER_ROW = 400  # a results row's fields besides its texts


def results_need(config: EvalConfig, examples: list[Example], out: Path) -> diskspace.Need:
    """results.jsonl still to write, as UTF-8 text (~4 bytes per answer token), twice: the
    final rewrite in data order makes a whole new copy before the old one goes. The floor,
    below which it is refused, assumes answers of a quarter of --max-new-tokens."""
    path = out / RESULTS
    done = {str(row["id"]) for row in read_jsonl(path)} if path.is_file() else set()
    todo = [e for e in examples if e.id not in done]
    texts = sum(len(e.question.encode()) + len(e.answer.encode()) + BYTES_PER_ROW
                for e in todo)
    existing = path.stat().st_size if path.is_file() else 0
    high = texts + len(todo) * config.max_new_tokens * 4
    low = texts + len(todo) * config.max_new_tokens
    return diskspace.Need(2 * high + existing, 2 * low + existing,
                          f"eval ({len(todo)} answers x up to {config.max_new_tokens} tokens)")


def _check_prompts_fit(config: EvalConfig, template: PromptTemplate, examples: list[Example],
                       loaded: tuple[Any, Any] | None) -> None:
    """A prompt longer than the model's context is refused before anything is generated."""
    tokenizer = loaded[1] if loaded else load_tokenizer(config.model)
    context = model_context(loaded[0] if loaded else resolve(config.model).path)
    texts = [render(tokenizer, template.build(e.question), STUDENT_CHAT_DATE)
             for e in examples]
    prompts_fit(tokenizer, texts, context, config.max_new_tokens, "the prompt of question")


def _run(config: EvalConfig, template: PromptTemplate, examples: list[Example], out: Path,
         progress: bool, loaded: tuple[Any, Any] | None, started: float) -> dict[str, Any]:
    claim_directory(out, run_identity(config, template))

    done = _done_ids(out / RESULTS)
    todo = [e for e in examples if e.id not in done]
    if todo:
        engine = get_engine(config.model, config.engine_spec(), adapter=config.adapter,
                            device=config.device, batch_size=config.batch_size, loaded=loaded)
        try:
            run = _generate_into(out / RESULTS, engine, template, todo, config, progress)
        finally:
            engine.close()
        tokenizer = engine.tokenizer
        run["wall_time_s"] = round(time.perf_counter() - started, 3)
    else:
        tokenizer = loaded[1] if loaded else load_tokenizer(config.model)
        run = _previous_run(out / SUMMARY, config)
    rows = finalize_results(out / RESULTS, config.data, config.extractor, config.lenient)
    summary = build_summary(config, template, rows, run, tokenizer)
    write_json(out / SUMMARY, summary)
    return summary


def _check_unique_ids(examples: list[Example], data: str) -> None:
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise PrimekdError(f"{data} has the id {example.id!r} twice: results are keyed by "
                               "id, so give every row a unique `id` (or none)")
        seen.add(example.id)


def _check_model(config: EvalConfig) -> None:
    resolve(config.model)
    if config.adapter and not (Path(config.adapter) / "adapter_config.json").exists():
        raise PrimekdError(f"adapter directory {config.adapter} has no adapter_config.json")


def run_identity(config: EvalConfig, template: PromptTemplate) -> dict[str, Any]:
    """The parameters that decide the answers; a directory holds results of one identity."""
    return {
        "model": _normalize_ref(config.model),
        "adapter": _normalize_ref(config.adapter) if config.adapter else None,
        "adapter_sha256": adapter_hash(config.adapter) if config.adapter else None,
        "data": config.data if config.data in BUNDLED_SPLITS
        else _normalize_ref(str(resolve_data_path(config.data)[0])),
        "prompt_template": template.text,
        "few_shot": template.few_shot,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed if config.temperature > 0 else None,
        "engine": config.engine,
        # only when set, so directories written before the option still resume
        **({"stop_at_answer": True} if config.stop_at_answer else {}),
    }


def _normalize_ref(ref: str) -> str:
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def claim_directory(out: Path, identity: dict[str, Any]) -> None:
    """Record the run's identity, or check it matches the one that wrote existing results."""
    path, results = out / CONFIG, out / RESULTS
    has_rows = results.exists() and bool(read_jsonl(results))
    if has_rows and not path.exists():
        raise PrimekdError(f"{out} holds {RESULTS} but no {CONFIG}: it was not written by "
                           "`primekd eval`; choose another --out directory")
    if has_rows:
        stored = read_json(path)
        stored.setdefault("engine", "hf")  # written before there were engines
        changed = [k for k in identity if stored.get(k) != identity[k]]
        if changed:
            diffs = "; ".join(f"{k}: {_short(stored.get(k))} -> {_short(identity[k])}"
                              for k in changed)
            raise PrimekdError(f"{out} holds results of a run with other parameters ({diffs}); "
                               "use a new --out directory, or delete the old one to start over")
        return
    write_json(path, {"primekd_version": __version__, **identity})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    truncate_torn_tail(path)  # so the next append starts on a fresh line
    return {str(row["id"]) for row in read_jsonl(path)}


def _generate_into(path: Path, engine: Any, template: PromptTemplate, todo: list[Example],
                   config: EvalConfig, progress: bool) -> dict[str, Any]:
    """Generate answers for `todo`, appending each row as it finishes; return this run's
    figures."""
    batch_size = getattr(engine, "batch_size", None) or getattr(engine, "concurrency", None)
    prompts = encode_chats(engine.tokenizer, [template.build(e.question) for e in todo],
                           STUDENT_CHAT_DATE)
    n_tokens, started = 0, time.perf_counter()
    with _progress_bar(progress, len(todo)) as advance:
        for i, generation in engine.generate(prompts, config.sampling(template.stop)):
            append_jsonl(path, [result_row(todo[i], generation, config.extractor,
                                           config.lenient)])
            n_tokens += generation.n_tokens
            advance(1, n_tokens)
    seconds = time.perf_counter() - started
    return {"batch_size": batch_size, "generated_this_run": len(todo),
            "generated_tokens": n_tokens, "generation_time_s": round(seconds, 3),
            "tokens_per_s": round(n_tokens / seconds, 2) if seconds > 0 else None}


def _previous_run(summary_path: Path, config: EvalConfig) -> dict[str, Any]:
    """With nothing left to generate, keep the figures of the run that generated the rows."""
    previous = read_json(summary_path) if summary_path.exists() else {}
    keys = ("wall_time_s", "generation_time_s", "generated_tokens", "tokens_per_s")
    batch_size = previous.get("generation", {}).get("batch_size", config.batch_size)
    return {k: previous.get(k) for k in keys} | {"batch_size": batch_size,
                                                 "generated_this_run": 0}


def result_row(example: Example, generation: Generation, extractor: str,
               lenient: bool = False) -> dict[str, Any]:
    graded = grade(generation.text, example.answer, extractor, generation.finish_reason,
                   lenient)
    return {
        "id": example.id,
        "question": example.question,
        "reference": example.answer,
        "gold": example.gold,
        "response": generation.text,
        **grade_fields(graded),
        "n_tokens": generation.n_tokens,
        "finish_reason": generation.finish_reason,
    }


def finalize_results(path: Path, data: str, extractor: str, lenient: bool = False
                     ) -> list[dict[str, Any]]:
    """Rewrite results in data order, one row per id, graded with `extractor` (truncated
    answers without a marker are not correct unless `lenient`)."""
    rows: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(path) if path.exists() else []:
        rows.setdefault(str(row["id"]), row)
    position = {e.id: i for i, e in enumerate(load_examples(data))}
    ordered = sorted(rows.values(), key=lambda r: position.get(str(r["id"]), len(position)))
    for row in ordered:
        graded = grade(row["response"], row["reference"], extractor, row.get("finish_reason"),
                       lenient)
        row.update(grade_fields(graded))
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    return ordered


def accuracy_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (the grading rule's), strict and flexible accuracy, truncation counts."""
    return summarize_grades(rows)


def build_summary(config: EvalConfig, template: PromptTemplate, rows: list[dict[str, Any]],
                  run: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    timing_keys = ("wall_time_s", "generation_time_s", "generated_tokens", "tokens_per_s",
                   "generated_this_run")
    return {
        **accuracy_summary(rows),
        "grading": "lenient" if config.lenient else "default",
        "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows) if rows else 0.0,
        "model": config.model,
        "adapter": config.adapter,
        "data": config.data,
        "prompt_template": template.text,
        "few_shot": template.few_shot,
        "extractor": config.extractor,
        "generation": {**config.sampling(template.stop).as_dict(),
                       "greedy": config.temperature == 0, "batch_size": run["batch_size"],
                       "stop_at_answer": config.stop_at_answer},
        "engine": config.engine,
        **{k: run.get(k) for k in timing_keys},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "primekd_version": __version__,
    }


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int, int], None]]:
    """Yields `advance(n_questions, tokens_so_far)`, which also shows tokens/s."""
    from rich.progress import TextColumn  # lazy: as in core.progress

    started = time.perf_counter()
    with progress_bar(enabled, TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task("generating", total=total, rate="")

        def advance(n: int, tokens: int) -> None:
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.1f} tok/s")

        yield advance
