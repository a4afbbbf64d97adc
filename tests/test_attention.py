"""Attention-head analysis: metric definitions, hook reduction, and the full command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from primekd.analyze.attention import (
    AttentionCollector,
    AttentionConfig,
    ModelBank,
    analyse,
    attention_hooks,
    cross_layer_similarity,
    head_metrics,
    js_divergence,
    pairwise_js,
    report_section,
)
from primekd.core.errors import PrimekdError

# A 3-token causal attention matrix: row 0 is forced, rows 1 and 2 carry the statistics.
A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
EYE = torch.eye(3)


def _entropy(row: list[float]) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


def _js_bits(p: list[float], q: list[float]) -> float:
    """JS divergence written out as the mean KL divergence to the mixture."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(x: list[float]) -> float:
        return sum(a * math.log(a / c) for a, c in zip(x, m, strict=True) if a > 0)

    return (kl(p) + kl(q)) / 2 / math.log(2)


def test_metrics_match_hand_computed_values() -> None:
    got = {name: float(value) for name, value in head_metrics(A, threshold=0.25, top_k=2).items()}
    entropy_row2 = _entropy([0.2, 0.3, 0.5]) / math.log(3)
    assert got["entropy"] == pytest.approx((1.0 + entropy_row2) / 2)  # row 1: ln 2 / ln 2
    # Row 1: no visible key below 0.25 (the masked zero above the diagonal does not count);
    # row 2: one of three keys.
    assert got["sparsity"] == pytest.approx((0 + 1 / 3) / 2)
    assert got["topk_mass"] == pytest.approx((1.0 + 0.8) / 2)
    assert got["self_attention"] == pytest.approx(0.5)
    assert got["previous_token"] == pytest.approx((0.5 + 0.3) / 2)
    assert got["sink"] == pytest.approx((0.5 + 0.2) / 2)
    assert float(head_metrics(A, top_k=1)["topk_mass"]) == pytest.approx(0.5)


def test_entropy_is_normalised_by_visible_keys() -> None:
    length = 7
    uniform = torch.ones(length, length).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)  # row i: 1/(i+1) on keys 0..i
    metrics = head_metrics(uniform)
    assert float(metrics["entropy"]) == pytest.approx(1.0)
    focused = torch.zeros(length, length)
    focused[:, 0] = 1.0  # a pure sink head
    assert float(head_metrics(focused)["entropy"]) == pytest.approx(0.0)
    assert float(head_metrics(focused)["sink"]) == pytest.approx(1.0)
    assert float(head_metrics(focused)["sparsity"]) == pytest.approx(
        sum(i / (i + 1) for i in range(1, length)) / (length - 1)
    )


def test_metrics_keep_leading_dimensions() -> None:
    batch = torch.stack([A, EYE]).unsqueeze(0)  # (1, 2, T, T): one model, two heads
    metrics = head_metrics(batch)
    assert metrics["self_attention"].shape == (1, 2)
    assert metrics["self_attention"][0, 1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        head_metrics(torch.ones(2, 3))


def test_cross_layer_and_js_match_hand_computed_values() -> None:
    cosine_row1 = 0.5 / math.sqrt(0.5)
    cosine_row2 = 0.5 / math.sqrt(0.2**2 + 0.3**2 + 0.5**2)
    assert float(cross_layer_similarity(A, EYE)) == pytest.approx((cosine_row1 + cosine_row2) / 2)
    assert float(cross_layer_similarity(A, A)) == pytest.approx(1.0)
    rows = js_divergence(A, EYE)
    assert float(rows[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(rows[1]) == pytest.approx(_js_bits([0.5, 0.5, 0], [0, 1, 0]))
    assert float(rows[2]) == pytest.approx(_js_bits([0.2, 0.3, 0.5], [0, 0, 1]))
    uniform = torch.ones(3, 3).tril() / torch.arange(1, 4).unsqueeze(1)
    models = torch.stack([A, EYE, uniform]).unsqueeze(1)  # (M=3, H=1, T, T)
    pairs = [(A, EYE), (A, uniform), (EYE, uniform)]
    expected = sum(float(js_divergence(p, q)[1:].mean()) for p, q in pairs) / 3
    assert float(pairwise_js(models)[0]) == pytest.approx(expected)


def _make_adapter(model_dir: Path, out: Path, seed: int, targets: list[str]) -> Path:
    from peft import LoraConfig, get_peft_model

    from primekd.core.models import load_model

    model = get_peft_model(
        load_model(str(model_dir), device="cpu"), LoraConfig(r=4, target_modules=targets)
    )
    generator = torch.Generator().manual_seed(seed)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero: perturb it so the adapter changes attention
            weight.data = torch.randn(weight.shape, generator=generator) * 0.5
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("attention_adapters")
    targets = ["q_proj", "k_proj", "v_proj"]
    return {
        "s1": str(_make_adapter(tiny_model_dir, root / "s1", 1, targets)),
        "s2": str(_make_adapter(tiny_model_dir, root / "s2", 2, targets)),
    }


def _bank(model_dir: Path, adapters: dict[str, str]) -> ModelBank:
    from peft import PeftModel

    from primekd.core.models import load_model

    model = load_model(str(model_dir), device="cpu", attn_implementation="eager")
    keys = []
    for i, directory in enumerate(adapters.values()):
        key = f"adapter{i}"
        if isinstance(model, PeftModel):
            model.load_adapter(directory, adapter_name=key)
        else:
            model = PeftModel.from_pretrained(model, directory, adapter_name=key)
        keys.append(key)
    model.eval()
    return ModelBank(model, keys)


def _collect(bank: ModelBank, ids: torch.Tensor, threshold: float = 0.05) -> AttentionCollector:
    config = bank.model.config
    collector = AttentionCollector(bank.size, config.num_hidden_layers,
                                   config.num_attention_heads, threshold, 3)
    collector.begin_prompt()
    bank.run(ids, collector.reduce_layer)
    collector.end_prompt()
    return collector


def _reference_attentions(bank: ModelBank, ids: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each model's attention maps from a plain `output_attentions=True` forward pass."""
    maps = []
    with torch.no_grad():
        with bank.model.disable_adapter():
            maps.append(bank.model(input_ids=ids, output_attentions=True).attentions)
        for key in bank.keys[1:]:
            bank.model.set_adapter(key)
            maps.append(bank.model(input_ids=ids, output_attentions=True).attentions)
    return maps


def test_accuracy_correlation_matches_hand_computed_values() -> None:
    import pandas as pd

    from primekd.analyze.attention.analysis import accuracy_correlation

    # One head, one metric, three models: means 1, 2, 4 against accuracies .1, .3, .2.
    table = pd.DataFrame({"model": ["a", "b", "c"], "layer": 0, "head": 0,
                          "metric": "entropy", "mean": [1.0, 2.0, 4.0]})
    result = accuracy_correlation(table, {"a": 0.1, "b": 0.3, "c": 0.2})
    row = result[result["scope"] == "head"].iloc[0]
    assert row["n_models"] == 3
    # Pearson by hand: deviations x = (-4/3, -1/3, 5/3), y = (-.1, .1, 0).
    assert row["pearson"] == pytest.approx((4 / 30 - 1 / 30) / math.sqrt(42 / 9 * 0.02))
    assert row["spearman"] == pytest.approx(0.5)  # ranks (1, 2, 3) vs (1, 3, 2)
    constant = accuracy_correlation(table, {"a": 0.2, "b": 0.2, "c": 0.2})
    assert constant["pearson"].isna().all() and constant["spearman"].isna().all()


def test_hook_statistics_equal_output_attentions(tiny_model_dir: Path, tiny_adapters) -> None:
    bank = _bank(tiny_model_dir, tiny_adapters)
    assert bank.mixed and bank.size == 3
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    means = _collect(bank, ids).means()
    reference = _reference_attentions(bank, ids)
    n_layers = len(reference[0])
    for m, attentions in enumerate(reference):
        for layer, weights in enumerate(attentions):
            expected = head_metrics(weights[0], threshold=0.05, top_k=3)
            for metric, values in expected.items():
                torch.testing.assert_close(
                    torch.from_numpy(means[metric][m, layer]).float(), values,
                    rtol=1e-4, atol=1e-5,
                )
            if layer + 1 < n_layers:
                similarity = cross_layer_similarity(weights[0], attentions[layer + 1][0])
                torch.testing.assert_close(
                    torch.from_numpy(means["cross_layer"][m, layer]).float(), similarity,
                    rtol=1e-4, atol=1e-5,
                )
    for layer in range(n_layers):
        stacked = torch.stack([attentions[layer][0] for attentions in reference])
        torch.testing.assert_close(torch.from_numpy(means["js_divergence"][layer]).float(),
                                   pairwise_js(stacked), rtol=1e-4, atol=1e-6)
    assert means["js_divergence"].min() > 0  # the perturbed adapters do change attention


def test_sequential_fallback_matches_mixed_batch(tiny_model_dir: Path, tiny_adapters) -> None:
    bank = _bank(tiny_model_dir, tiny_adapters)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    mixed = _collect(bank, ids).means()
    bank.mixed = False  # what DoRA or non-LoRA adapters get
    sequential = _collect(bank, ids).means()
    for metric, values in mixed.items():
        assert sequential[metric] == pytest.approx(values, rel=1e-3, abs=1e-4, nan_ok=True)


def test_attention_without_weights_is_a_clear_error(tiny_model_dir: Path) -> None:
    from primekd.core.models import load_model

    model = load_model(str(tiny_model_dir), device="cpu", attn_implementation="sdpa")
    with pytest.raises(PrimekdError, match="eager"), attention_hooks(model, lambda *_: None):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_bad_input_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from primekd.cli import app

    def invoke(*args: str) -> BaseException | None:
        result = CliRunner().invoke(app, ["attention", "--model", str(tiny_model_dir),
                                          "--out", str(tmp_path), *args])
        return result.exception

    assert "NAME=PATH" in str(invoke("--adapter", "no-equals-sign"))
    assert "adapter_config.json" in str(invoke("--adapter", f"s={tmp_path}"))
    assert "(0, 1]" in str(invoke("--threshold", "2"))
    assert "no model named" in str(invoke("--results", f"ghost={tmp_path}/r.jsonl"))


def _write_results(path: Path, correct: int, total: int = 10) -> str:
    rows = [{"id": str(i), "correct": i < correct} for i in range(total)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_single_model_run_on_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = AttentionConfig(model=str(tiny_model_dir), out=tmp_path, limit=2, max_length=24,
                             heads_top=1, plots=False)
    result = analyse(config, progress=False)
    assert set(result.table["model"]) == {"base"}
    assert result.ranking.empty and "note" in result.summary
    assert (tmp_path / "head_metrics.parquet").exists()


@pytest.mark.integration
def test_bundled_model_with_two_adapters_writes_every_output(tmp_path: Path) -> None:
    from primekd.core.models import BUNDLED_ALIAS, resolve

    base_dir = Path(resolve(BUNDLED_ALIAS).path)
    s1 = _make_adapter(base_dir, tmp_path / "s1", 1, ["q_proj", "k_proj"])
    s2 = tmp_path / "s2"  # a second student: the first one's LoRA B negated (no second load)
    _negated_copy(s1, s2)
    out = tmp_path / "run" / "attention"
    results = {name: _write_results(tmp_path / f"{name}.jsonl", k)
               for name, k in (("base", 3), ("s1", 5), ("s2", 4))}
    config = AttentionConfig(
        model=BUNDLED_ALIAS, out=out, adapters={"s1": str(s1), "s2": str(s2)},
        limit=2, max_length=48, heads_top=1, results=results, device="cpu",
    )
    result = analyse(config, progress=False)

    for name in ("head_metrics.parquet", "head_metrics.csv", "head_ranking.csv",
                 "summary.json", "accuracy_correlation.csv"):
        assert (out / name).is_file(), name
    import pandas as pd

    table = pd.read_parquet(out / "head_metrics.parquet")
    assert list(table.columns[:6]) == ["model", "layer", "head", "metric", "mean", "sd"]
    assert set(table["model"]) == {"base", "s1", "s2"}
    assert table["layer"].nunique() == 30 and table["head"].nunique() == 9
    ranking = pd.read_csv(out / "head_ranking.csv")
    assert len(ranking) == 30 * 9
    assert ranking["js_divergence"].is_monotonic_decreasing
    plots = {path.name for path in (out / "plots").glob("*.png")}
    assert {"metrics_by_layer.png", "layer_entropy.png", "diff_s1.png", "diff_s2.png",
            "head_js_divergence.png"} <= plots
    assert any(name.startswith("attention_01_") for name in plots)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 2 and summary["accuracy"]["s1"] == 0.5
    assert len(summary["accuracy_correlation"]) == 7

    section = report_section(out)
    assert "## Attention heads" in section and "](attention/plots/diff_s1.png)" in section
    for link in [part.split(")")[0] for part in section.split("](")[1:]]:
        assert (out.parent / link).exists(), link
    assert result.ranking.iloc[0]["rank"] == 1


def _negated_copy(source: Path, target: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(source / "adapter_model.safetensors")
    flipped = {k: -v if "lora_B" in k else v for k, v in weights.items()}
    save_file(flipped, target / "adapter_model.safetensors")
