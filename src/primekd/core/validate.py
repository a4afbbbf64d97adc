"""Checks on options beyond what their fields declare (types, ranges and choices are checked
by `primekd.core.options.check`): devices, few-shot examples that exist, prompts that fit the
model's context. Each failure is one PrimekdError line naming the option.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from primekd.core.data import load_examples
from primekd.core.errors import PrimekdError
from primekd.core.options import check

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|meta)(:\d+)?")


def device(value: Any) -> str | None:
    """cpu, cuda, cuda:1, mps, ... (None: the default)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _DEVICE.fullmatch(value.strip()):
        raise PrimekdError(f"--device must be cpu, cuda, cuda:N or mps, not {value!r}")
    return value


def check_eval(config: Any) -> None:
    """Every option of `primekd eval` (an `EvalConfig`): as its fields declare them, then the
    few-shot examples that exist and the device."""
    check(config)
    few_shot(config.few_shot)
    device(config.device)


def few_shot(k: Any) -> int:
    """--few-shot: 0 up to the number of worked train solutions there are to show."""
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
