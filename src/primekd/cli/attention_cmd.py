"""`primekd attention`: per-head attention metrics of a base model and its adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from primekd.analyze.attention.config import AttentionConfig
from primekd.cli.app import app, console
from primekd.core import options
from primekd.core.io import dumps


def _attention(given: dict[str, Any], as_json: bool) -> None:
    from primekd.analyze.attention import analyse  # lazy: torch, scipy, pandas

    config = AttentionConfig(**given)
    result = analyse(config, progress=True)
    if as_json:
        print(dumps(result.summary, indent=2, default=str))
        return
    _print_summary(result.summary, Path(config.out))


app.command("attention")(options.command(AttentionConfig, [
    options.extra("as_json", "--json", default=False, annotation=bool,
                  help="Print the summary as JSON on stdout."),
], _attention, """Per-head attention metrics of a model and its adapters, compared on identical
    tokens.

    Writes into --out: head_metrics.parquet and .csv (model, layer, head, metric, mean, sd);
    head_ranking.csv (heads where the models differ most first); summary.json; plots/*.png.

    The model runs with eager attention. Definitions of every metric: docs/attention.md.
    """))


def _print_summary(summary: dict, out: Path) -> None:
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
