"""Per-head statistics of causal attention matrices (definitions in docs/attention.md).

Every function takes attention weights shaped (..., T, T): row i holds query position i's
distribution over key positions 0..i (causal; entries above the diagonal are zero). Row 0
has a single visible key, so its distribution is forced (weight 1 on key 0) and says nothing
about the head: every row statistic is averaged over rows 1..T-1 only, which also keeps the
entropy normalisation log(i + 1) away from log(1) = 0.
"""

from __future__ import annotations

import math

import torch

# The per-model metrics, in the order tables and plots list them.
METRICS: tuple[str, ...] = (
    "entropy",
    "sparsity",
    "topk_mass",
    "self_attention",
    "previous_token",
    "sink",
    "cross_layer",
)
# Cross-model divergence of the attention rows (one value per head, not per model).
JS_METRIC = "js_divergence"

METRIC_LABELS: dict[str, str] = {
    "entropy": "normalised entropy",
    "sparsity": "sparsity (share of keys below threshold)",
    "topk_mass": "top-k mass",
    "self_attention": "self-attention (diagonal)",
    "previous_token": "previous-token attention",
    "sink": "first-position (sink) attention",
    "cross_layer": "cross-layer similarity (cosine, layer l vs l+1)",
    JS_METRIC: "mean pairwise JS divergence across models (bits)",
}


def _check(weights: torch.Tensor) -> int:
    if weights.dim() < 2 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"attention weights must be (..., T, T), got {tuple(weights.shape)}")
    length = weights.shape[-1]
    if length < 2:
        raise ValueError("attention statistics need at least two positions")
    return length


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of every row, with 0 log 0 = 0: shape (..., T)."""
    return -torch.special.xlogy(weights, weights).sum(-1)


def visible_keys(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n_i = i + 1, the number of keys query i may attend to under the causal mask."""
    return torch.arange(1, length + 1, dtype=torch.float32, device=device)


def head_metrics(
    weights: torch.Tensor, threshold: float = 0.01, top_k: int = 5
) -> dict[str, torch.Tensor]:
    """The single-layer metrics of each head, averaged over rows 1..T-1: shapes (...,).

    `cross_layer` needs two layers and comes from `cross_layer_similarity`.
    """
    length = _check(weights)
    weights = weights.float()
    n_keys = visible_keys(length, weights.device)[1:]
    causal = torch.ones(length, length, dtype=torch.bool, device=weights.device).tril()
    below = ((weights < threshold) & causal).sum(-1)[..., 1:]
    rows = {
        "entropy": row_entropy(weights)[..., 1:] / n_keys.log(),
        "sparsity": below / n_keys,
        "topk_mass": weights.topk(min(top_k, length), dim=-1).values.sum(-1)[..., 1:],
        "self_attention": weights.diagonal(dim1=-2, dim2=-1)[..., 1:],
        "previous_token": weights.diagonal(offset=-1, dim1=-2, dim2=-1),
        "sink": weights[..., 1:, 0],
    }
    return {name: values.mean(-1) for name, values in rows.items()}


def cross_layer_similarity(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Mean over rows 1..T-1 of the cosine similarity of the same head's rows in two layers."""
    _check(lower)
    cosine = torch.nn.functional.cosine_similarity(
        lower[..., 1:, :].float(), upper[..., 1:, :].float(), dim=-1
    )
    return cosine.mean(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (bits, in [0, 1]) between matching rows of p and q."""
    mixture = (p + q) / 2
    nats = row_entropy(mixture) - (row_entropy(p) + row_entropy(q)) / 2
    return nats.clamp_min(0) / math.log(2)


def pairwise_js(weights: torch.Tensor) -> torch.Tensor:
    """Mean JS divergence over all model pairs and rows 1..T-1.

    `weights` is (M, H, T, T): M models' attention on identical tokens. Returns (H,).
    Pairs are formed one at a time, so memory stays at a few (H, T, T) buffers.
    """
    _check(weights)
    models = weights.shape[0]
    if models < 2:
        raise ValueError("pairwise JS divergence needs at least two models")
    weights = weights.float()
    total = torch.zeros(weights.shape[1], device=weights.device)
    for a in range(models):
        for b in range(a + 1, models):
            total += js_divergence(weights[a], weights[b])[..., 1:].mean(-1)
    return total / (models * (models - 1) / 2)
