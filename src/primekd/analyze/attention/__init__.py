"""Attention-head analysis: per-head metrics of a base model and its adapters, compared.

Library entry point: `analyse(AttentionConfig(...)) -> AttentionResult`; the report helper
embeds `report_section(out_dir)`. Metric definitions: docs/attention.md. The names below load
their module (and torch) on first use, so importing the options stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from primekd.analyze.attention.config import AttentionConfig

_LAZY = {
    "AttentionResult": "analysis", "analyse": "analysis",
    "AttentionCollector": "hooks", "ModelBank": "hooks", "attention_hooks": "hooks",
    "JS_METRIC": "metrics", "METRICS": "metrics", "cross_layer_similarity": "metrics",
    "head_metrics": "metrics", "js_divergence": "metrics", "pairwise_js": "metrics",
    "report_section": "report",
}
__all__ = ["AttentionConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
