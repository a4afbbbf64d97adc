"""The attention section of the run report, as Markdown built from an output directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from primekd.core.io import read_json

_SHOWN = ("entropy", "sparsity", "self_attention", "previous_token", "sink", "cross_layer")


def report_section(
    out_dir: str | Path, relative_to: str | Path | None = None, heading_level: int = 2
) -> str:
    """Markdown summarising `primekd attention` output in `out_dir`.

    Image links are relative to `relative_to`, by default the parent of `out_dir` (in a run
    directory, `runs/<experiment>/attention/` sits beside `report.md`).
    """
    out_dir = Path(out_dir)
    summary = read_json(out_dir / "summary.json")
    base = Path(relative_to) if relative_to is not None else out_dir.parent
    link = _linker(out_dir, base)
    h = "#" * heading_level
    parts = [
        f"{h} Attention heads",
        _intro(summary),
        _model_table(summary),
        _top_heads(summary, link),
        _correlation(summary),
        _figures(summary, link, h),
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def _linker(out_dir: Path, base: Path) -> Any:
    def link(relative: str) -> str:
        target = os.path.relpath(out_dir / relative, base)
        return Path(target).as_posix()

    return link


def _intro(summary: dict[str, Any]) -> str:
    config = summary["config"]
    tokens = summary["tokens"]
    text = "question + reference answer" if config.get("with_answer") else "bare question"
    lines = [
        f"Models: {', '.join(f'`{name}`' for name in summary['models'])} "
        f"(base `{summary['base']}`, {summary['n_layers']} layers x {summary['n_heads']} heads).",
        f"Inputs: {summary['n_prompts']} prompts from `{config['data']}` ({text}, chat format, "
        f"{tokens['min']}-{tokens['max']} tokens, mean {tokens['mean']:.0f}), identical for "
        "every model. Row statistics skip query position 0; sparsity threshold "
        f"{config['threshold']}, top-k mass k = {config['top_k']}. Definitions: docs/attention.md.",
    ]
    if summary.get("note"):
        lines.append(f"Note: {summary['note']}.")
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _sig(value: Any) -> str:
    """Three significant digits: JS divergences and variances can be tiny."""
    return "n/a" if value is None else f"{value:.3g}"


def _model_table(summary: dict[str, Any]) -> str:
    header = "| model | " + " | ".join(_SHOWN) + " |"
    rule = "|---|" + "---:|" * len(_SHOWN)
    rows = [
        f"| {model} | " + " | ".join(_fmt(means.get(m)) for m in _SHOWN) + " |"
        for model, means in summary["model_means"].items()
    ]
    intro = "Mean over all layers and heads:"
    return "\n".join([intro, "", header, rule, *rows])


def _top_heads(summary: dict[str, Any], link: Any) -> str:
    heads = summary.get("top_heads") or []
    if not heads:
        return ""
    rows = [
        f"| {h['rank']} | {h['layer']} | {h['head']} | {_sig(h['js_divergence'])} | "
        f"{_sig(h.get('var_entropy'))} | {_sig(h.get('var_sink'))} |"
        for h in heads
    ]
    return "\n".join([
        f"Heads where the models differ most (mean pairwise Jensen-Shannon divergence of "
        f"their attention rows, bits; full list: [head_ranking.csv]({link('head_ranking.csv')})):",
        "",
        "| rank | layer | head | JS divergence | var entropy | var sink |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])


def _correlation(summary: dict[str, Any]) -> str:
    accuracy = summary.get("accuracy") or {}
    rows = summary.get("accuracy_correlation") or []
    if not accuracy or not rows:
        return ""
    accuracies = ", ".join(f"{name} {value:.3f}" for name, value in accuracy.items())
    lines = [
        f"Accuracy: {accuracies}. Correlation of each metric (mean over all heads) with "
        f"accuracy across {rows[0]['n_models']} models (few models: read as a hint only):",
        "",
        "| metric | Pearson r | Spearman r |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['metric']} | {_fmt(r['pearson'], 2)} | {_fmt(r['spearman'], 2)} |"
              for r in rows]
    return "\n".join(lines)


def _figures(summary: dict[str, Any], link: Any, h: str) -> str:
    files = [name for name in summary.get("files", []) if name.endswith(".png")]
    if not files:
        return ""
    captions = {
        "plots/metrics_by_layer.png": "Metrics by layer, one line per model",
        "plots/head_js_divergence.png": "Cross-model JS divergence per head",
    }
    lines = [f"{h}# Attention figures"]
    for name in files:
        stem = Path(name).stem
        if stem.startswith("layer_"):
            continue  # the grid already shows each metric; the single plots stay linked below
        caption = captions.get(name) or _caption(stem)
        lines.append(f"![{caption}]({link(name)})")
    singles = [name for name in files if Path(name).stem.startswith("layer_")]
    if singles:
        lines.append("Single-metric plots: " + ", ".join(
            f"[{Path(name).stem.removeprefix('layer_')}]({link(name)})" for name in singles
        ))
    return "\n\n".join(lines)


def _caption(stem: str) -> str:
    if stem.startswith("diff_"):
        return f"Difference from the base model: {stem.removeprefix('diff_')}"
    if stem.startswith("attention_"):
        return f"Attention maps, {stem.split('_')[-1]}, on one example"
    return stem
