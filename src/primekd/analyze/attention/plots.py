"""PNG plots of the head metrics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from primekd.analyze.attention.metrics import METRIC_LABELS, METRICS  # noqa: E402
from primekd.core.io import atomic_write  # noqa: E402

DPI = 110


def _save(fig: plt.Figure, path: Path, tight: bool = True) -> Path:
    """Write and close; `tight=False` for figures already laid out by tight_layout."""
    bbox = "tight" if tight else None
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches=bbox))
    plt.close(fig)
    return path


def _layer_means(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean over heads of each layer: rows are layers, columns models."""
    rows = table[table["metric"] == metric]
    return rows.groupby(["layer", "model"])["mean"].mean().unstack("model")


def _draw_layers(ax: plt.Axes, table: pd.DataFrame, names: list[str], metric: str) -> None:
    means = _layer_means(table, metric)
    for name in names:
        if name in means:
            ax.plot(means.index, means[name], marker="o", markersize=3, linewidth=1.4, label=name)
    ax.set_title(METRIC_LABELS[metric], fontsize=10)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def metric_by_layer(table: pd.DataFrame, names: list[str], metric: str, path: Path) -> Path:
    """One metric (mean over a layer's heads) across layers, one line per model."""
    fig, ax = plt.subplots(figsize=(7, 4))
    _draw_layers(ax, table, names, metric)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return _save(fig, path)


def metrics_by_layer(table: pd.DataFrame, names: list[str], path: Path) -> Path:
    """Every metric across layers in one grid, one line per model."""
    columns = 4
    rows = math.ceil(len(METRICS) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, METRICS, strict=False):
        _draw_layers(ax, table, names, metric)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[len(METRICS):]:
        ax.axis("off")
    spare = axes.flat[len(METRICS)] if len(axes.flat) > len(METRICS) else axes.flat[0]
    spare.legend(handles, labels, loc="center", fontsize=10, title="model")
    fig.suptitle("Attention metrics by layer (mean over heads)")
    fig.tight_layout()
    return _save(fig, path, tight=False)


def _grid(table: pd.DataFrame, model: str, metric: str) -> pd.DataFrame:
    rows = table[(table["model"] == model) & (table["metric"] == metric)]
    return rows.pivot(index="layer", columns="head", values="mean")


def difference_heatmaps(table: pd.DataFrame, base: str, student: str, path: Path) -> Path:
    """Layer x head heatmaps of student minus base, one panel per metric."""
    columns = 4
    rows = math.ceil(len(METRICS) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 4.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, METRICS, strict=False):
        diff = _grid(table, student, metric) - _grid(table, base, metric)
        limit = float(np.nanmax(np.abs(diff.to_numpy()))) if diff.size else 0.0
        limit = limit if np.isfinite(limit) and limit > 0 else 1e-9
        image = ax.imshow(diff.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit,
                          aspect="auto", interpolation="nearest")
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes.flat[len(METRICS):]:
        ax.axis("off")
    fig.suptitle(f"{student} minus {base}, per head (red: higher in {student})")
    fig.tight_layout()
    return _save(fig, path, tight=False)


def head_heatmap(ranking: pd.DataFrame, column: str, path: Path) -> Path:
    """Layer x head heatmap of one ranking column (e.g. the cross-model JS divergence)."""
    grid = ranking.pivot(index="layer", columns="head", values=column)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * grid.shape[1] + 2), max(3.5, 0.22 * len(grid))))
    image = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(METRIC_LABELS.get(column, column), fontsize=10)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _label(token: str, width: int = 12) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    return text if len(text) <= width else text[: width - 1] + "…"


def attention_maps(
    matrices: np.ndarray, tokens: list[str], names: list[str], layer: int, head: int, path: Path
) -> Path:
    """One head's T x T attention on one example, models side by side, tokens on the axes.

    Colours use a square-root scale so that weak attention stays visible next to the sink.
    """
    length = len(tokens)
    panel = float(np.clip(0.11 * length, 4.0, 11.0))
    fontsize = float(np.clip(700 / max(length, 1) / 2.2, 3.5, 8.0))
    step = max(1, math.ceil(length / 80))
    ticks = np.arange(0, length, step)
    labels = [_label(tokens[i]) for i in ticks]
    fig, axes = plt.subplots(1, len(names), figsize=(panel * len(names) + 1, panel + 1),
                             squeeze=False, sharey=True)
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    for ax, name, matrix in zip(axes.flat, names, matrices, strict=True):
        image = ax.imshow(matrix, cmap="magma", norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=11)
        ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
        ax.set_xlabel("key")
    axes.flat[0].set_yticks(ticks, labels, fontsize=fontsize)
    axes.flat[0].set_ylabel("query")
    fig.colorbar(image, ax=list(axes.flat), fraction=0.02, pad=0.02, label="attention weight")
    fig.suptitle(f"layer {layer}, head {head}", fontsize=12)
    return _save(fig, path)
