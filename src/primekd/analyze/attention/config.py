"""The attention stage's options (light: no torch), read by the CLI and `run` configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from primekd.core.errors import PrimekdError
from primekd.core.options import force_field, option

DEFAULT_LIMIT = 32


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


@dataclass
class AttentionConfig:
    """What to analyse. `adapters` and `results` map a model name to a directory/file."""

    model: str = option(help="Base model: a model alias (`primekd models` lists them), a "
                        "HF directory, a .gguf file, or a hub id.", set_by="experiment")
    out: str | Path = option(help="Output directory (created if missing).", cli_type=Path,
                             set_by="experiment")
    adapters: dict[str, str] = option(
        help="A LoRA adapter (e.g. a student from `primekd distill`) to compare, under NAME. "
        "Repeat for several; the base model is always included as `base`.", factory=dict,
        flags=("--adapter",), cli_type=list[str], name="adapter", metavar="NAME=DIR",
        parse=lambda values: parse_named(values, "--adapter"), set_by="experiment")
    data: str = option("test", "Questions: a bundled split (train, test, test_socratic) or a "
                       "JSONL file with `question` and `answer`.", set_by="experiment")
    sample: int | None = option(None, "Draw N questions at random (seeded) instead of the "
                                "first ones.", ge=1)
    seed: int = option(0, "Seed for --sample.")
    limit: int | None = option(None, f"Use at most N questions (default {DEFAULT_LIMIT} when "
                               "--sample is not given).", ge=1)
    max_length: int = option(256, "Cut every sequence to its first L tokens (memory grows as "
                             "L^2).", ge=2)
    with_answer: bool = option(False, "Append the reference answer after the chat-formatted "
                               "question, so the answer tokens are analysed too.")
    heads_top: int = option(5, "How many top-ranked heads to list and draw as attention maps.",
                            ge=1)
    threshold: float = option(0.01, "Sparsity threshold: the share of visible keys with "
                              "attention weight below X.", gt=0, le=1)
    top_k: int = option(5, "k of the top-k mass metric.", ge=1)
    results: dict[str, str] = option(
        help="results.jsonl from `primekd eval` for model NAME (`base` or an adapter name); "
        "with 2+ of them, each metric is correlated with accuracy across models.",
        factory=dict, cli_type=list[str], metavar="NAME=FILE",
        parse=lambda values: parse_named(values, "--results"), set_by="experiment")
    base_name: str = option("base", "The base model's name in tables and plots.", cli=False,
                            set_by="experiment")
    device: str | None = option(None, "cpu, cuda, cuda:1", default_text="auto")
    plots: bool = option(True, "Draw the plots (--no-plots: write the tables only).",
                         default_text="--plots")
    force: bool = force_field()
