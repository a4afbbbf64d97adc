"""`primekd eval`: answer GSM8K (or any question/answer JSONL) with a model, grade, save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from primekd.cli.app import (
    BASE_URL_HELP,
    ENGINE_HELP,
    ENGINE_OPTION_HELP,
    app,
    console,
    engine_options,
)
from primekd.core.io import dumps
from primekd.core.models import BUNDLED_ALIAS
from primekd.evaluate.evaluator import EvalConfig, evaluate


@app.command("eval")
def eval_command(
    model: str = typer.Option(
        ..., "--model", "-m",
        help=f"Model: the bundled alias {BUNDLED_ALIAS!r}, a local Hugging Face directory, "
        "a .gguf file, or a hub id (needs the hub to be reachable).",
        show_default=False,
    ),
    out: Path = typer.Option(
        ..., "--out", "-o",
        help="Output directory for results.jsonl, summary.json and eval_config.json. "
        "Rerunning into it resumes; other model/prompt/generation settings are refused.",
        show_default=False,
    ),
    adapter: Path | None = typer.Option(
        None, "--adapter", help="A PEFT (LoRA) adapter directory to apply to the model."
    ),
    data: str = typer.Option(
        "test", "--data",
        help="Questions: a bundled GSM8K split (test, train, test_socratic) or a JSONL file "
        "with `question` and `answer` (solution ending `#### N`, or a bare number) per row.",
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="Evaluate at most this many questions (default: all)."
    ),
    offset: int = typer.Option(0, "--offset", help="Skip this many questions first."),
    sample: int | None = typer.Option(
        None, "--sample",
        help="Draw this many questions at random (seeded by --seed) before --offset/--limit.",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed for --sample, and for sampling when --temperature > 0."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b",
        help="hf: questions generated together (default: 16 on CPU, 64 on GPU; larger is "
        "faster until memory runs out). vllm: requests in flight (default 64). Every answer "
        "is saved as it finishes.",
    ),
    max_new_tokens: int = typer.Option(
        256, "--max-new-tokens",
        help="Longest answer in tokens; longer answers are cut (finish_reason `length`).",
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", help="Sampling temperature; 0 (the default) is greedy decoding."
    ),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Nucleus sampling threshold (only with --temperature > 0)."
    ),
    prompt: str | None = typer.Option(
        None, "--prompt",
        help="Custom prompt template (the user turn), as text or a path to a file; "
        "a Jinja template, `{{ question }}` marks where the question goes. Default: "
        "zero-shot, step by step, ending with 'The answer is N'.",
    ),
    few_shot: int = typer.Option(
        0, "--few-shot",
        help="Put this many worked GSM8K train solutions before the prompt (0: zero-shot).",
    ),
    extractor: str = typer.Option(
        "default", "--extractor",
        help="How to find the final answer: `default` (boxed, ####, 'the answer is', "
        "'Answer:', last number), `paper` (the precedence of Goyal et al. 2024) or "
        "`math-verify` (Hugging Face's Math-Verify).",
    ),
    lenient: bool = typer.Option(
        False, "--lenient",
        help="Count a truncated answer's last number (harness-style flexible grading). By "
        "default an answer cut at --max-new-tokens without a stated answer is wrong.",
    ),
    stop_at_answer: bool = typer.Option(
        False, "--stop-at-answer",
        help="End each answer at the end of its final-answer line ('The answer is N.', "
        "'#### N', a closed \\boxed{}): saves tokens and keeps rambling out of the grade.",
    ),
    device: str | None = typer.Option(
        None, "--device", help="hf engine: cpu, cuda, cuda:1, mps, ... (default: cuda if "
        "available, else cpu)."
    ),
    engine: str = typer.Option("hf", "--engine", help=ENGINE_HELP),
    base_url: str | None = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    engine_option: list[str] = typer.Option([], "--engine-option", help=ENGINE_OPTION_HELP),
    json_output: bool = typer.Option(
        False, "--json", help="Print summary.json to stdout instead of a table."
    ),
    force: bool = typer.Option(
        False, "--force",
        help="Write into a non-empty --out that primekd did not make, beside the files "
        "there (never overwriting or deleting them).",
    ),
) -> None:
    """Answer questions with a model (+ adapter), grade them, and write results + summary."""
    config = EvalConfig(
        model=model, out=out, adapter=str(adapter) if adapter else None, data=data,
        limit=limit, offset=offset, sample=sample, seed=seed, batch_size=batch_size,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, prompt=prompt,
        few_shot=few_shot, extractor=extractor, device=device, engine=engine,
        base_url=base_url, engine_options=engine_options(engine_option), lenient=lenient,
        stop_at_answer=stop_at_answer, force=force,
    )
    summary = evaluate(config, progress=True)
    if json_output:
        print(dumps(summary))
    else:
        _print_summary(summary, out)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    lo, hi = summary["ci95"]
    rate = summary.get("tokens_per_s")
    speed = f", {rate:.1f} tokens/s" if rate else ""
    console.print(
        f"[bold]{summary['correct']}/{summary['n']}[/] correct: "
        f"[bold]{100 * summary['accuracy']:.1f}%[/] (95% CI {100 * lo:.1f}–{100 * hi:.1f}%), "
        f"{summary['no_answer']} without an answer, {summary['truncated']} cut at "
        f"--max-new-tokens{speed}",
        highlight=False,
    )
    console.print(
        f"strict (stated answer only) {100 * summary['accuracy_strict']:.1f}%, flexible "
        f"(last number anywhere) {100 * summary['accuracy_flexible']:.1f}%, grading "
        f"{summary['grading']}", highlight=False)
    console.print(f"results in {out / 'results.jsonl'}, summary in {out / 'summary.json'}",
                  highlight=False)
