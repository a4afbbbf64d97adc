"""The attention stage's options (light: no torch), read by the CLI and `run` configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LIMIT = 32


@dataclass
class AttentionConfig:
    """What to analyse. `adapters` and `results` map a model name to a directory/file."""

    model: str
    out: str | Path
    adapters: dict[str, str] = field(default_factory=dict)
    data: str = "test"
    sample: int | None = None
    seed: int = 0
    limit: int | None = None  # default: DEFAULT_LIMIT questions unless `sample` is given
    max_length: int = 256
    with_answer: bool = False
    heads_top: int = 5
    threshold: float = 0.01
    top_k: int = 5
    results: dict[str, str] = field(default_factory=dict)
    base_name: str = "base"
    device: str | None = None
    plots: bool = True
    force: bool = False  # write into a non-empty --out of someone else's (never overwriting)
