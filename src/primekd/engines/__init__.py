"""One generation layer for every stage: `generate` answers, `score` teacher-forced answers.

Two engines implement it:

- `hf` (`primekd.engines.hf`): transformers in this process, CPU or GPU, static batches;
- `vllm` (`primekd.engines.vllm`): a vLLM OpenAI-compatible server over HTTP, started by
  primekd from its own Python environment or reached at a user-given `base_url`; requests
  go concurrently and come back as they finish.

Prompts are token ids (the caller renders the chat template, `encode_chats`), so both engines
see exactly the same input. Both calls are iterators of `(index, result)` pairs in the order
results finish, so callers save rows as they come (a killed run loses only what was in
flight). Sampling parameters override whatever the model's `generation_config` carries
(repetition penalty, top-k, ...): greedy is greedy in both engines.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from primekd.core.chat import encode_prompts, render
from primekd.core.errors import PrimekdError
from primekd.core.options import option
from primekd.engines.base import (  # noqa: F401  re-exported
    Cut,
    Generation,
    SamplingParams,
    TopK,
    cut_text,
    finish,
)
from primekd.engines.hf import HFEngine

ENGINES = ("hf", "vllm")
# hf engine options: split a model over devices (accelerate's big-model loading), e.g. a
# teacher too large for one GPU: device_map=auto, max_memory={0: 70GiB, 1: 70GiB, cpu: 200GiB}
HF_OPTIONS = ("device_map", "max_memory")


class Engine(Protocol):
    """What every engine offers. `tokenizer` is the model's (HF) tokenizer."""

    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams
                 ) -> Iterator[tuple[int, Generation]]: ...

    def score(self, prompts: Sequence[list[int]], continuations: Sequence[list[int]], k: int
              ) -> Iterator[tuple[int, TopK]]: ...

    def close(self) -> None: ...


@dataclass
class EngineSpec:
    """Which engine, and its options (the `engine:` section of a run config)."""

    name: str = "hf"
    base_url: str | None = None  # vllm: use this running server instead of starting one
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.name not in ENGINES:
            raise PrimekdError(f"--engine must be one of {', '.join(ENGINES)}, not {self.name!r}")
        if self.base_url and self.name != "vllm":
            raise PrimekdError("--base-url needs --engine vllm")
        if self.name == "vllm":
            from primekd.engines.vllm import check_options  # lazy: asyncio + httpx, ~110 modules

            check_options(self.options)
        else:
            for key in self.options:
                if key not in HF_OPTIONS:
                    raise PrimekdError(f"--engine-option {key} is not an hf engine option; "
                                       f"the hf engine takes {', '.join(HF_OPTIONS)}")
            if self.options.get("max_memory") is not None and not self.options.get(
                    "device_map"):
                raise PrimekdError("--engine-option max_memory needs device_map (e.g. "
                                   "device_map=auto): it bounds what a device map places")


ENGINE_HELP = ("Generation engine: hf (transformers in this process, CPU or GPU) or vllm "
               "(a vLLM server: started from .venv-vllm, `make vllm`, or reached at --base-url)")
BASE_URL_HELP = ("With --engine vllm: a running vLLM/SGLang OpenAI-compatible server of the "
                 "same model (checked by tokenizing a probe text) instead of starting one.")
ENGINE_OPTION_HELP = ("vllm engine option key=value, repeatable: max_model_len, "
                      "gpu_memory_utilization, dtype, tensor_parallel_size, "
                      "pipeline_parallel_size, max_num_seqs, enforce_eager, python, command, "
                      "extra_args, kv_cache_space, startup_timeout, concurrency, score_tokens, "
                      "lora, served_model (docs/engines.md).")


def engine_field(help: str = ENGINE_HELP, set_by: str | None = "experiment") -> Any:
    """The `engine` option of the stages that generate (teach, eval, on-policy distill)."""
    return option("hf", help, set_by=set_by)


def device_field() -> Any:
    """`--device` of the hf engine (teach, eval)."""
    return option(None, "hf engine: cpu, cuda, cuda:1, mps, ... (default: cuda if available, "
                  "else cpu).")


def stop_at_answer_field() -> Any:
    """`--stop-at-answer`, the same in teach and eval (each engine applies it as a cut hook)."""
    return option(False, "End each answer at the end of its final-answer line ('The answer is "
                  "N.', '#### N', a closed \\boxed{}): saves tokens and keeps rambling out of "
                  "the grade; a teacher's cut answer ends with the end-of-turn token.",
                  flags=("--stop-at-answer",))


def base_url_field() -> Any:
    return option(None, BASE_URL_HELP, set_by="experiment")


def engine_options_field(help: str = ENGINE_OPTION_HELP) -> Any:
    """`--engine-option k=v` (repeatable) -> the `engine_options` mapping."""
    return option(help=help, factory=dict, flags=("--engine-option",), cli_type=list[str],
                  parse=parse_options, name="engine_option", set_by="experiment")


def teacher_engine_options_field(help: str) -> Any:
    """`--teacher-engine-option k=v` (repeatable): the teacher's options where a command
    runs a student and a teacher (unset: the same as `--engine-option`)."""
    return option(None, help, flags=("--teacher-engine-option",), cli_type=list[str],
                  parse=parse_options, name="teacher_engine_option", set_by="experiment")


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """`["max_model_len=4096", "enforce_eager=true"]` -> {"max_model_len": 4096, ...}
    (values read as YAML)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise PrimekdError(f"--engine-option {item!r}: write it as key=value, "
                               "e.g. max_model_len=4096")
        try:
            options[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            options[key] = text
    return options


def get_engine(model: str, spec: EngineSpec | None = None, *, adapter: str | None = None,
               device: str | None = None, batch_size: int | None = None,
               loaded: tuple[Any, Any] | None = None) -> Engine:
    """An engine for `model` (+ `adapter`). The vllm engine reuses a server already running
    for the same model and options (one at a time; see `engines.vllm.shutdown`)."""
    spec = spec or EngineSpec()
    spec.check()
    if spec.name == "vllm":
        from primekd.engines.vllm import VLLMEngine  # lazy: see check

        return VLLMEngine.open(model, adapter=adapter, base_url=spec.base_url,
                               options=spec.options, batch_size=batch_size)

    if loaded is not None:
        return HFEngine(*loaded, batch_size=batch_size)
    return HFEngine.load(model, adapter=adapter, device=device, batch_size=batch_size,
                         **spec.options)


def encode_chats(tokenizer: Any, chats: Sequence[Any], date_string: str | None = None
                 ) -> list[list[int]]:
    """Chat prompts -> the token ids both engines receive."""
    return encode_prompts(tokenizer, [render(tokenizer, c, date_string) for c in chats])


def collect(pairs: Iterator[tuple[int, Any]], n: int) -> list[Any]:
    """The results of a `generate`/`score` iterator, in prompt order."""
    results: list[Any] = [None] * n
    for index, result in pairs:
        results[index] = result
    return results
