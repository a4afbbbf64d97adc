"""Attention-head analysis: per-head metrics of a base model and its adapters, compared.

Library entry point: `analyse(AttentionConfig(...)) -> AttentionResult`; the report helper
embeds `report_section(out_dir)`. Metric definitions: docs/attention.md.
"""

from primekd.attention.analysis import AttentionConfig, AttentionResult, analyse
from primekd.attention.hooks import AttentionCollector, ModelBank, attention_hooks
from primekd.attention.metrics import (
    JS_METRIC,
    METRICS,
    cross_layer_similarity,
    head_metrics,
    js_divergence,
    pairwise_js,
)
from primekd.attention.report import report_section

__all__ = [
    "JS_METRIC",
    "METRICS",
    "AttentionCollector",
    "AttentionConfig",
    "AttentionResult",
    "ModelBank",
    "analyse",
    "attention_hooks",
    "cross_layer_similarity",
    "head_metrics",
    "js_divergence",
    "pairwise_js",
    "report_section",
]
