"""`analyse(config)`: per-head attention metrics of a base model and its adapters.

Every model sees exactly the same token sequences: the chat-formatted bare question the
students are trained on, optionally followed by the reference answer. The statistics are
reduced inside per-layer hooks (`primekd.analyze.attention.hooks`), then written as a tidy table,
a ranked head list, a summary and plots.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from primekd.analyze.attention.config import DEFAULT_LIMIT, AttentionConfig
from primekd.analyze.attention.hooks import AttentionCollector, ModelBank, attention_modules
from primekd.analyze.attention.metrics import JS_METRIC, METRIC_LABELS, METRICS
from primekd.core import diskspace, options, outdir
from primekd.core.chat import ChatPrompt, encode_prompts, render
from primekd.core.data import Example, load_examples
from primekd.core.errors import PrimekdError
from primekd.core.io import atomic_write, read_jsonl, write_json
from primekd.core.models import load_model, load_tokenizer, resolve
from primekd.core.progress import progress_bar
from primekd.core.validate import device as check_device


@dataclass
class AttentionResult:
    out_dir: Path
    table: pd.DataFrame  # tidy: model, layer, head, metric, mean, sd, n
    ranking: pd.DataFrame  # one row per head, most different across models first
    summary: dict[str, Any]
    plots: list[Path]


@dataclass
class _Prompt:
    example: Example
    token_ids: list[int]


def analyse(config: AttentionConfig, progress: bool = True) -> AttentionResult:
    """Run the analysis and write every output into `config.out`."""
    validate(config)
    outdir.check_out(config.out, "attention", config.force)  # before minutes of computing
    with diskspace.guard(config.out, OUTPUT_NEED), \
            outdir.claimed(config.out, "attention", config.force):
        return _analyse(config, progress)


# Rough: a few tables and a dozen PNG plots; a figure for the full-disk message, never a
# reason to refuse
OUTPUT_NEED = diskspace.Need(10 << 20, 0, "attention (head metrics, plots)")


def _analyse(config: AttentionConfig, progress: bool) -> AttentionResult:
    started = time.time()
    out_dir = Path(config.out)
    accuracies = {name: accuracy(path) for name, path in config.results.items()}
    examples = _select_examples(config)
    bank, tokenizer, names = _load_models(config)
    prompts = build_prompts(tokenizer, examples, config.max_length, config.with_answer)
    n_heads = _num_heads(bank.model)
    collector = _collect(bank, prompts, n_heads, config, progress)
    table = tidy_table(collector, names)
    ranking = rank_heads(collector, table, names)
    correlation = accuracy_correlation(table, accuracies)
    example = min(prompts, key=lambda prompt: len(prompt.token_ids))
    top_heads = _plot_heads(ranking, table, config.heads_top)
    maps = capture_maps(bank, example.token_ids, top_heads)
    tokens = [tokenizer.decode([token]) for token in example.token_ids]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tables(out_dir, table, ranking, correlation)
    plots = []
    if config.plots:
        plots = _write_plots(out_dir, table, ranking, names, maps, tokens, config)
    summary = build_summary(
        config, names, prompts, example, table, ranking, accuracies, correlation, plots,
        bank.mixed, time.time() - started,
    )
    write_json(out_dir / "summary.json", summary)
    return AttentionResult(out_dir, table, ranking, summary, plots)


def validate(config: AttentionConfig) -> None:
    options.check(config)  # types, ranges, as the fields declare them
    check_device(config.device)
    if config.base_name in config.adapters:
        raise PrimekdError(
            f"adapter name {config.base_name!r} is taken by the base model: pick another name"
        )
    for name, directory in config.adapters.items():
        if not name:
            raise PrimekdError("every --adapter needs a name: NAME=DIR")
        if not (Path(directory) / "adapter_config.json").exists():
            raise PrimekdError(
                f"adapter {name!r}: {directory} has no adapter_config.json "
                "(give a PEFT adapter directory, as written by `primekd distill`)"
            )
    models = [config.base_name, *config.adapters]
    for name, path in config.results.items():
        if name not in models:
            raise PrimekdError(
                f"--results {name}=...: no model named {name!r} (models: {', '.join(models)})"
            )
        if not Path(path).is_file():
            raise PrimekdError(f"--results {name}={path}: file does not exist")
    if len(config.results) == 1:
        raise PrimekdError("correlating metrics with accuracy needs --results for 2+ models")


def accuracy(path: str | Path) -> float:
    """Share of `correct` rows in a results.jsonl from `primekd eval`."""
    rows = read_jsonl(path)
    if not rows:
        raise PrimekdError(f"{path} holds no results")
    if any("correct" not in row for row in rows):
        raise PrimekdError(f"{path}: every row needs a `correct` field (results from primekd eval)")
    return float(np.mean([bool(row["correct"]) for row in rows]))


def _select_examples(config: AttentionConfig) -> list[Example]:
    limit = config.limit
    if limit is None and config.sample is None:
        limit = DEFAULT_LIMIT
    return load_examples(config.data, limit=limit, sample=config.sample, seed=config.seed)


def _load_models(config: AttentionConfig) -> tuple[ModelBank, Any, list[str]]:
    """The base model with eager attention and every adapter loaded under an internal key."""
    source = resolve(config.model)
    try:
        model = load_model(source, device=config.device, attn_implementation="eager")
    except PrimekdError as e:
        raise PrimekdError(f"{e} (attention analysis loads models with eager attention)") from e
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise PrimekdError(
            f"{config.model} did not load with eager attention, which the analysis needs"
        )
    keys = [f"adapter{i}" for i in range(len(config.adapters))]
    for key, (name, directory) in zip(keys, config.adapters.items(), strict=True):
        model = _add_adapter(model, key, name, directory)
    model.eval()
    model.to(next(model.parameters()).device)
    return ModelBank(model, keys), load_tokenizer(source), [config.base_name, *config.adapters]


def _add_adapter(model: Any, key: str, name: str, directory: str) -> Any:
    from peft import PeftModel  # lazy: ~1.5 s that a base-model-only analysis skips

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(directory, adapter_name=key)
            return model
        return PeftModel.from_pretrained(model, directory, adapter_name=key)
    except Exception as e:  # noqa: BLE001 - shape mismatches etc. become one line
        raise PrimekdError(
            f"adapter {name!r} ({directory}) does not fit the base model {type(e).__name__}: {e}"
        ) from e


def _num_heads(model: Any) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_attention_heads)


def build_prompts(
    tokenizer: Any, examples: list[Example], max_length: int, with_answer: bool
) -> list[_Prompt]:
    """Chat-formatted bare questions (plus the reference answer), cut to max_length tokens."""
    texts = [
        render(tokenizer, ChatPrompt(user=e.question, prefill=e.answer if with_answer else ""))
        for e in examples
    ]
    prompts = [
        _Prompt(example, ids[:max_length])
        for example, ids in zip(examples, encode_prompts(tokenizer, texts), strict=True)
    ]
    prompts = [prompt for prompt in prompts if len(prompt.token_ids) >= 2]
    if not prompts:
        raise PrimekdError("every selected prompt is shorter than 2 tokens: nothing to analyse")
    return prompts


def _collect(
    bank: ModelBank,
    prompts: list[_Prompt],
    n_heads: int,
    config: AttentionConfig,
    progress: bool,
) -> AttentionCollector:
    device = next(bank.model.parameters()).device
    n_layers = len(attention_modules(bank.model))
    collector = AttentionCollector(bank.size, n_layers, n_heads, config.threshold, config.top_k)
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"attention of {bank.size} model(s)", total=len(prompts))
        for prompt in prompts:
            collector.begin_prompt()
            ids = torch.tensor([prompt.token_ids], device=device)
            bank.run(ids, collector.reduce_layer)
            collector.end_prompt()
            bar.advance(task)
    return collector


def _progress_bar(enabled: bool) -> Any:
    return progress_bar(enabled, transient=True)


def tidy_table(collector: AttentionCollector, names: list[str]) -> pd.DataFrame:
    """One row per (model, layer, head, metric) with the mean and sd over prompts."""
    frames = []
    for metric, stats in collector.stats.items():
        mean, sd, count = stats.mean(), stats.sd(), stats.count
        m, layer, head = np.indices(mean.shape).reshape(3, -1)
        frames.append(pd.DataFrame({
            "model": np.asarray(names)[m],
            "layer": layer,
            "head": head,
            "metric": metric,
            "mean": mean.ravel(),
            "sd": sd.ravel(),
            "n": count.ravel().astype(int),
        }))
    table = pd.concat(frames, ignore_index=True)
    return table[table["n"] > 0].reset_index(drop=True)


def rank_heads(
    collector: AttentionCollector, table: pd.DataFrame, names: list[str]
) -> pd.DataFrame:
    """Heads ordered by mean pairwise JS divergence across models, with each metric's spread.

    `var_<metric>` is the population variance across models of the head's per-model mean.
    With a single model there is nothing to compare: the table is empty.
    """
    columns = ["rank", "layer", "head", JS_METRIC, f"{JS_METRIC}_sd"]
    columns += [f"var_{metric}" for metric in METRICS]
    if len(names) < 2:
        return pd.DataFrame(columns=columns)
    js_mean, js_sd = collector.js.mean(), collector.js.sd()
    layer, head = np.indices(js_mean.shape).reshape(2, -1)
    ranking = pd.DataFrame({
        "layer": layer, "head": head, JS_METRIC: js_mean.ravel(), f"{JS_METRIC}_sd": js_sd.ravel()
    })
    spread = (
        table.groupby(["metric", "layer", "head"])["mean"].var(ddof=0)
        .unstack("metric").add_prefix("var_").reset_index()
    )
    ranking = ranking.merge(spread, on=["layer", "head"], how="left")
    ranking = ranking.sort_values(JS_METRIC, ascending=False, kind="stable").reset_index(drop=True)
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    return ranking.reindex(columns=columns)


def accuracy_correlation(table: pd.DataFrame, accuracies: dict[str, float]) -> pd.DataFrame:
    """Pearson and Spearman r of each metric with accuracy across models.

    Scopes: `model` (metric averaged over all heads), `layer` (over a layer's heads) and
    `head`. Empty when fewer than two models have results.
    """
    columns = ["metric", "scope", "layer", "head", "n_models", "pearson", "spearman"]
    if len(accuracies) < 2:
        return pd.DataFrame(columns=columns)
    rows = table[table["model"].isin(accuracies)]
    acc = pd.Series(accuracies)
    frames = []
    for scope, keys in (("model", []), ("layer", ["layer"]), ("head", ["layer", "head"])):
        means = rows.groupby(["metric", *keys, "model"])["mean"].mean().unstack("model")
        means = means.reindex(columns=acc.index)
        frame = means.apply(lambda values: _correlations(values.to_numpy(), acc.to_numpy()),
                            axis=1, result_type="expand")
        frame.columns = ["n_models", "pearson", "spearman"]
        frame["n_models"] = frame["n_models"].astype(int)
        frame = frame.reset_index().assign(scope=scope)
        frames.append(frame)
    result = pd.concat(frames, ignore_index=True)
    return result.reindex(columns=columns)


def _correlations(values: np.ndarray, target: np.ndarray) -> tuple[int, float, float]:
    keep = ~np.isnan(values)
    x, y = values[keep], target[keep]
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:  # undefined: nan, without a warning
        return len(x), float("nan"), float("nan")
    return len(x), float(pearsonr(x, y).statistic), float(spearmanr(x, y).statistic)


def _plot_heads(ranking: pd.DataFrame, table: pd.DataFrame, count: int) -> list[tuple[int, int]]:
    """The heads shown as attention maps: top of the ranking, or (one model) the most focused."""
    if len(ranking):
        top = ranking.head(count)
    else:
        entropy = table[table["metric"] == "entropy"].sort_values("mean", kind="stable")
        top = entropy.head(count)
    return [(int(layer), int(head)) for layer, head in zip(top["layer"], top["head"], strict=True)]


def capture_maps(
    bank: ModelBank, token_ids: list[int], heads: list[tuple[int, int]]
) -> dict[tuple[int, int], np.ndarray]:
    """Full (M, T, T) attention maps of a few heads on one prompt, for plotting."""
    wanted: dict[int, list[int]] = {}
    for layer, head in heads:
        wanted.setdefault(layer, []).append(head)
    maps: dict[tuple[int, int], np.ndarray] = {}

    def keep(layer: int, weights: torch.Tensor) -> None:
        for head in wanted.get(layer, []):
            maps[(layer, head)] = weights[:, head].float().cpu().numpy()

    device = next(bank.model.parameters()).device
    bank.run(torch.tensor([token_ids], device=device), keep)
    return {head: maps[head] for head in heads if head in maps}


def _write_tables(
    out_dir: Path, table: pd.DataFrame, ranking: pd.DataFrame, correlation: pd.DataFrame
) -> None:
    atomic_write(out_dir / "head_metrics.parquet", lambda path: table.to_parquet(path, index=False))
    atomic_write(out_dir / "head_metrics.csv", lambda path: table.to_csv(path, index=False))
    atomic_write(out_dir / "head_ranking.csv", lambda path: ranking.to_csv(path, index=False))
    correlation_path = out_dir / "accuracy_correlation.csv"
    if len(correlation):
        atomic_write(correlation_path, lambda path: correlation.to_csv(path, index=False))
    else:
        correlation_path.unlink(missing_ok=True)


def _write_plots(
    out_dir: Path,
    table: pd.DataFrame,
    ranking: pd.DataFrame,
    names: list[str],
    maps: dict[tuple[int, int], np.ndarray],
    tokens: list[str],
    config: AttentionConfig,
) -> list[Path]:
    from primekd.analyze.attention import plots  # lazy: matplotlib, only with config.plots

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in plot_dir.glob("*.png"):
        stale.unlink()
    written = [plots.metrics_by_layer(table, names, plot_dir / "metrics_by_layer.png")]
    for metric in METRICS:
        path = plot_dir / f"layer_{metric}.png"
        written.append(plots.metric_by_layer(table, names, metric, path))
    for name in names[1:]:
        path = plot_dir / f"diff_{_slug(name)}.png"
        written.append(plots.difference_heatmaps(table, config.base_name, name, path))
    if len(ranking):
        written.append(plots.head_heatmap(ranking, JS_METRIC, plot_dir / "head_js_divergence.png"))
    for rank, ((layer, head), matrices) in enumerate(maps.items(), start=1):
        path = plot_dir / f"attention_{rank:02d}_L{layer}H{head}.png"
        written.append(plots.attention_maps(matrices, tokens, names, layer, head, path))
    return written


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def build_summary(
    config: AttentionConfig,
    names: list[str],
    prompts: list[_Prompt],
    example: _Prompt,
    table: pd.DataFrame,
    ranking: pd.DataFrame,
    accuracies: dict[str, float],
    correlation: pd.DataFrame,
    plots: list[Path],
    mixed: bool,
    seconds: float,
) -> dict[str, Any]:
    lengths = [len(prompt.token_ids) for prompt in prompts]
    model_level = correlation[correlation["scope"] == "model"].to_dict("records")
    overall = table.groupby(["model", "metric"])["mean"].mean().unstack("metric")
    top = ranking.head(config.heads_top)
    out_dir = Path(config.out)
    summary = {
        "config": {**asdict(config), "out": str(config.out)},
        "models": names,
        "base": config.base_name,
        "adapters": dict(config.adapters),
        "n_prompts": len(prompts),
        "prompt_ids": [prompt.example.id for prompt in prompts],
        "tokens": {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)},
        "n_layers": int(table["layer"].max()) + 1,
        "n_heads": int(table["head"].max()) + 1,
        "metrics": {name: METRIC_LABELS[name] for name in (*METRICS, JS_METRIC)},
        "model_means": {
            model: {metric: _finite(overall.loc[model, metric]) for metric in METRICS}
            for model in names
        },
        "top_heads": [_clean_row(row) for row in top.to_dict("records")],
        "example_id": example.example.id,
        "accuracy": accuracies,
        "accuracy_correlation": [_clean_row(row) for row in model_level],
        "run_mode": "mixed-adapter batch" if mixed else "sequential (adapters PEFT cannot mix)",
        "files": _output_files(correlation) + [str(path.relative_to(out_dir)) for path in plots],
        "seconds": round(seconds, 2),
    }
    if len(names) < 2:
        summary["note"] = "one model only: no cross-model spread or head ranking"
    return summary


def _output_files(correlation: pd.DataFrame) -> list[str]:
    files = ["head_metrics.parquet", "head_metrics.csv", "head_ranking.csv", "summary.json"]
    return files + (["accuracy_correlation.csv"] if len(correlation) else [])


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, np.integer | int):
            cleaned[key] = int(value)
        elif isinstance(value, np.floating | float):
            cleaned[key] = _finite(value)
        else:
            cleaned[key] = value
    return cleaned
