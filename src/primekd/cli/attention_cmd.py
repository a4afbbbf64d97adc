"""`primekd attention`: per-head attention metrics of a base model and its adapters."""

from __future__ import annotations

from pathlib import Path

import typer

from primekd.cli.app import app, console
from primekd.core.errors import PrimekdError
from primekd.core.io import dumps


def parse_named(values: list[str], option: str) -> dict[str, str]:
    """Turn NAME=PATH options into a dict, with a clear error for a malformed or repeated one."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise PrimekdError(f"{option} {value!r}: write it as NAME=PATH")
        if name in named:
            raise PrimekdError(f"{option}: the name {name!r} is given twice")
        named[name.strip()] = path.strip()
    return named


@app.command("attention")
def attention_command(
    model: str = typer.Option(
        ..., "--model",
        help="Base model: the bundled alias, a HF directory, a .gguf file, or a hub id.",
    ),
    adapter: list[str] = typer.Option(
        [], "--adapter", metavar="NAME=DIR",
        help="A LoRA adapter (e.g. a student from `primekd distill`) to compare, under NAME. "
        "Repeat for several; the base model is always included as `base`.",
    ),
    data: str = typer.Option(
        "test", "--data", help="Questions: a bundled split (train, test, test_socratic) or a JSONL "
        "file with `question` and `answer`.",
    ),
    sample: int | None = typer.Option(
        None, "--sample", help="Draw N questions at random (seeded) instead of the first ones."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for --sample."),
    limit: int | None = typer.Option(
        None, "--limit", help="Use at most N questions (default 32 when --sample is not given)."
    ),
    max_length: int = typer.Option(
        256, "--max-length", help="Cut every sequence to its first L tokens (memory grows as L^2)."
    ),
    with_answer: bool = typer.Option(
        False, "--with-answer/--no-with-answer",
        help="Append the reference answer after the chat-formatted question, so the answer "
        "tokens are analysed too.",
    ),
    heads_top: int = typer.Option(
        5, "--heads-top", help="How many top-ranked heads to list and draw as attention maps."
    ),
    threshold: float = typer.Option(
        0.01, "--threshold",
        help="Sparsity threshold: the share of visible keys with attention weight below X.",
    ),
    top_k: int = typer.Option(5, "--top-k", help="k of the top-k mass metric."),
    results: list[str] = typer.Option(
        [], "--results", metavar="NAME=FILE",
        help="results.jsonl from `primekd eval` for model NAME (`base` or an adapter name); with "
        "2+ of them, each metric is correlated with accuracy across models.",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: auto)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Write the tables only."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    out: Path = typer.Option(..., "--out", help="Output directory (created if missing)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out that "
                               "primekd did not make, beside the files there (never "
                               "overwriting or deleting them)."),
) -> None:
    """Per-head attention metrics of a model and its adapters, compared on identical tokens.

    Writes into --out: head_metrics.parquet and .csv (model, layer, head, metric, mean, sd);
    head_ranking.csv (heads where the models differ most first); summary.json; plots/*.png.

    The model runs with eager attention. Definitions of every metric: docs/attention.md.
    """
    from primekd.analyze.attention import AttentionConfig, analyse

    config = AttentionConfig(
        model=model,
        out=out,
        adapters=parse_named(adapter, "--adapter"),
        data=data,
        sample=sample,
        seed=seed,
        limit=limit,
        max_length=max_length,
        with_answer=with_answer,
        heads_top=heads_top,
        threshold=threshold,
        top_k=top_k,
        results=parse_named(results, "--results"),
        device=device,
        plots=not no_plots,
        force=force,
    )
    result = analyse(config, progress=True)
    if as_json:
        print(dumps(result.summary, indent=2, default=str))
        return
    _print_summary(result.summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    console.print(
        f"analysed {summary['n_prompts']} prompts x {len(summary['models'])} model(s), "
        f"{summary['n_layers']} layers x {summary['n_heads']} heads in {summary['seconds']:.1f} s"
    )
    if summary["top_heads"]:
        table = Table(title="heads where the models differ most")
        for column in ("rank", "layer", "head", "JS divergence (bits)"):
            table.add_column(column, justify="right")
        for head in summary["top_heads"]:
            js = head["js_divergence"]
            table.add_row(str(head["rank"]), str(head["layer"]), str(head["head"]),
                          "n/a" if js is None else f"{js:.4f}")
        console.print(table)
    for row in summary["accuracy_correlation"]:
        console.print(f"{row['metric']}: r = {row['pearson']} with accuracy")
    console.print(f"wrote {len(summary['files'])} files to {out}")
