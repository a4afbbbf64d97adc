"""`primekd teach`: run a teacher under a priming strategy and write a teacher store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from primekd.cli.app import (
    BASE_URL_HELP,
    ENGINE_HELP,
    ENGINE_OPTION_HELP,
    app,
    console,
    engine_options,
)
from primekd.core.errors import PrimekdError
from primekd.core.io import dumps
from primekd.teach.priming import all_strategies
from primekd.teach.teacher import TeachConfig, teach


@app.command("teach")
def teach_command(
    teacher: str = typer.Option(None, "--teacher", "-m", help="Teacher model: the bundled "
                                "alias smollm2-135m-instruct, a HF directory, a .gguf file or "
                                "a hub id."),
    strategy: str = typer.Option("none", "--strategy", "-s", help="Priming strategy name "
                                 "(see --list-strategies)."),
    strategies: Path = typer.Option(None, "--strategies", help="YAML file with more "
                                    "strategies (Jinja2 templates over question, reference, "
                                    "answer)."),
    list_strategies: bool = typer.Option(False, "--list-strategies", help="Print every "
                                         "strategy with its exact text and exit."),
    out: Path = typer.Option(None, "--out", "-o", help="Store directory to create, or to "
                             "resume when it holds a store made with the same parameters."),
    data: str = typer.Option("train", "--data", help="Transfer set: train, test, "
                             "test_socratic, or a JSONL file with question and answer."),
    limit: int = typer.Option(None, "--limit", help="Use at most N questions."),
    offset: int = typer.Option(0, "--offset", help="Skip the first K questions."),
    sample: int = typer.Option(None, "--sample", help="Draw N random questions "
                               "(seeded by --seed) before --offset/--limit."),
    seed: int = typer.Option(0, "--seed", help="Seed for --sample and for sampling."),
    samples_per_question: int = typer.Option(1, "--samples-per-question", "-k",
                                             help="Answers per question (needs "
                                             "--temperature > 0 when above 1)."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="Sampling "
                                      "temperature; 0 is greedy. Stored log-probs are "
                                      "always at temperature 1."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in "
                                       "tokens."),
    top_k: int = typer.Option(20, "--top-k", help="Teacher log-probs kept per answer "
                              "token."),
    target: str = typer.Option("generated", "--target", help="generated: the teacher's own "
                               "answers; reference: the teacher reads the reference "
                               "solution (teacher forcing)."),
    keep: str = typer.Option("all", "--keep", help="all, or correct: keep only correct "
                             "answers (rejection sampling; accuracy is still over all)."),
    engine: str = typer.Option("hf", "--engine", help=ENGINE_HELP),
    base_url: str = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    engine_option: list[str] = typer.Option([], "--engine-option", help=ENGINE_OPTION_HELP),
    shard: str = typer.Option(None, "--shard", help="i/n: take every n-th question from "
                              "the i-th (0-based), to split the set across n processes, "
                              "each with its own --out."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Answers per part: every "
                                   "batch_size finished answers are saved as one part (and "
                                   "the hf engine's batch)."),
    device: str = typer.Option(None, "--device", help="Torch device for --engine hf "
                               "(default: cuda if available, else cpu)."),
    stop_at_answer: bool = typer.Option(False, "--stop-at-answer", help="End each answer "
                                        "at its final-answer line ('The answer is N.', "
                                        "'#### N'), followed by the end-of-turn token."),
    lenient: bool = typer.Option(False, "--lenient", help="Grade a truncated answer by its "
                                 "last number (by default it is wrong without a stated "
                                 "answer); affects `correct` and --keep correct."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out that "
                               "primekd did not make, beside the files there (never "
                               "overwriting or deleting them)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Run a teacher under a priming strategy and write a teacher store (resumable)."""
    if list_strategies:
        _print_strategies(strategies, as_json)
        return
    if teacher is None or out is None:
        raise PrimekdError("primekd teach needs --teacher and --out "
                           "(or --list-strategies); see primekd teach --help")
    config = TeachConfig(
        teacher=teacher, out=out, strategy=strategy, strategies_file=strategies, data=data,
        limit=limit, offset=offset, sample=sample, seed=seed,
        samples_per_question=samples_per_question, temperature=temperature,
        max_new_tokens=max_new_tokens, top_k=top_k, target=target, keep=keep,
        shard=shard, batch_size=batch_size, device=device, engine=engine, base_url=base_url,
        engine_options=engine_options(engine_option), stop_at_answer=stop_at_answer,
        lenient=lenient, force=force,
    )
    manifest = teach(config, progress=True)
    if as_json:
        print(dumps(manifest, indent=2, ensure_ascii=False))
    else:
        _print_summary(manifest, out)


def _print_strategies(strategies_file: Path | None, as_json: bool) -> None:
    strategies = all_strategies(strategies_file)
    if as_json:
        print(dumps([s.to_dict() for s in strategies.values()], indent=2,
                         ensure_ascii=False))
        return
    for s in strategies.values():
        console.rule(f"[bold]{s.name}[/]: {s.description}", align="left")
        if s.system:
            console.print("system: " + s.system, highlight=False, markup=False)
        console.print(s.user, highlight=False, markup=False)
        if s.prefill:
            console.print("prefill: " + s.prefill, highlight=False, markup=False)


def _print_summary(manifest: dict, out: Path) -> None:
    counts = manifest["counts"]
    accuracy = manifest["teacher_accuracy"]
    table = Table(title=f"teacher store {out}", show_header=False)
    table.add_row("strategy", manifest["strategy"]["name"])
    table.add_row("target", manifest["target"])
    table.add_row("rows (kept / answered)", f"{counts['kept']} / {counts['rows']}")
    table.add_row("teacher accuracy",
                  "n/a (reference)" if accuracy is None else f"{accuracy:.1%}")
    table.add_row("mean answer tokens", f"{manifest['mean_answer_tokens'] or 0:.1f}")
    rate = manifest["generation_tokens_per_s"]
    table.add_row("generation tokens/s", "n/a" if rate is None else f"{rate:.1f}")
    table.add_row("wall time", f"{manifest['wall_time_s']:.1f} s")
    table.add_row("complete", str(manifest["complete"]))
    console.print(table)
