"""Checks every command runs on its options before any model loads or any file is written.

Small reusable validators (one per kind of value), and one `check_*` per command that
applies them to its config. Each failure is one PrimekdError line naming the option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from primekd.core.errors import PrimekdError

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|meta)(:\d+)?")


def _flag(name: str) -> str:
    return name if name.startswith("-") or " " in name else "--" + name.replace("_", "-")


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
            optional: bool = False) -> int | None:
    """An int (not a bool, not 2.7) within [minimum, maximum]."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrimekdError(f"{_flag(name)} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise PrimekdError(f"{_flag(name)} must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise PrimekdError(f"{_flag(name)} must be at most {maximum}, not {value}")
    return value


def number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None,
           optional: bool = False) -> float | None:
    """A finite int or float (not a bool, not NaN or inf) within the given bounds."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PrimekdError(f"{_flag(name)} must be a finite number, not {value!r}")
    checks = ((minimum, value < minimum if minimum is not None else False, "at least"),
              (maximum, value > maximum if maximum is not None else False, "at most"),
              (above, value <= above if above is not None else False, "above"),
              (below, value >= below if below is not None else False, "below"))
    for bound, failed, words in checks:
        if failed:
            raise PrimekdError(f"{_flag(name)} must be {words} {bound}, not {value}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PrimekdError(f"{_flag(name)} must be true or false, not {value!r}")
    return value


def text(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise PrimekdError(f"{_flag(name)} must be a string, not {value!r}")
    return value


def device(value: Any) -> str | None:
    """cpu, cuda, cuda:1, mps, ... (None: the default)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _DEVICE.fullmatch(value.strip()):
        raise PrimekdError(f"--device must be cpu, cuda, cuda:N or mps, not {value!r}")
    return value


def data_slice(config: Any) -> None:
    """limit / offset / sample / seed, shared by eval, teach and run's data sections."""
    integer("limit", config.limit, 1, optional=True)
    integer("offset", getattr(config, "offset", 0), 0)
    integer("sample", config.sample, 1, optional=True)
    integer("seed", config.seed)


def check_eval(config: Any) -> None:
    """Every option of `primekd eval` (an `EvalConfig`)."""
    text("model", config.model)
    data_slice(config)
    integer("batch_size", config.batch_size, 1, optional=True)
    integer("max_new_tokens", config.max_new_tokens, 1)
    number("temperature", config.temperature, minimum=0)
    number("top_p", config.top_p, above=0, maximum=1)
    few_shot(config.few_shot)
    device(config.device)


def check_teach(config: Any) -> None:
    """Every numeric option of `primekd teach` (a `TeachConfig`)."""
    text("teacher", config.teacher)
    data_slice(config)
    integer("samples_per_question", config.samples_per_question, 1)
    number("temperature", config.temperature, minimum=0)
    integer("max_new_tokens", config.max_new_tokens, 1)
    integer("top_k", config.top_k, 1)
    integer("batch_size", config.batch_size, 1)
    device(config.device)


def few_shot(k: Any) -> int:
    """--few-shot: 0 up to the number of worked train solutions there are to show."""
    from primekd.core.data import load_examples

    integer("few_shot", k, 0)
    if k:
        available = len(load_examples("train"))
        if k > available:
            raise PrimekdError(f"--few-shot {k} asks for more worked examples than there are "
                               f"({available} in GSM8K train)")
    return k


def model_context(model_or_path: Any) -> int | None:
    """The longest sequence the model takes, from its config (None when it does not say)."""
    config = getattr(model_or_path, "config", None)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_or_path)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompts_fit(tokenizer: Any, texts: Sequence[str], context: int | None,
                new_tokens: int, what: str = "prompt") -> None:
    """Refuse prompts that, with `new_tokens` to generate, exceed the model's context."""
    if context is None or not texts:
        return
    lengths = [len(ids) for ids in
               tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] + new_tokens > context:
        raise PrimekdError(
            f"{what} {longest + 1} is {lengths[longest]} tokens; with {new_tokens} new tokens "
            f"that exceeds the model's context of {context} tokens (shorten the question, "
            "lower --few-shot or --max-new-tokens)")
