"""The options of `primekd distill` as a dataclass, read from YAML and checked.

Kept apart from `primekd.distill.trainer` so that the CLI, `primekd run` and `primekd tune` can
build and validate configs without importing torch and transformers (seconds of start-up).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from primekd.core.errors import PrimekdError, did_you_mean
from primekd.core.io import read_yaml
from primekd.core.models import BUNDLED_ALIAS

OBJECTIVES = ("kd", "sft")
KEEP = ("all", "correct")  # which teacher answers a student trains on (rejection sampling)
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}
SCHEDULERS = ("cosine", "linear", "constant")
# Fields that do not change what is trained: a --resume may differ in these.
_RUN_ONLY_FIELDS = {"resume", "out", "logging_steps", "save_steps", "num_workers", "config",
                    "force"}


@dataclass
class DistillConfig:
    """Every option of `primekd distill` (YAML keys of `--config` are these field names)."""

    out: str = ""
    student: str = BUNDLED_ALIAS
    teacher_store: str | list[str] | None = None  # a directory, several shards, or a glob
    objective: str = "kd"  # kd: teacher store (CE + divergence); sft: CE only
    data: str | None = None  # sft without a store: bundled split or JSONL (default: train)
    limit: int | None = None  # use only the first N questions (store or data)
    keep: str = "all"  # all | correct: train only on teacher answers graded correct
    val_size: int = 0  # questions held out of training for the validation loss
    prompt: str | None = None  # the student's prompt template (None: eval's zero-shot default)
    divergence: str = "reverse_kl"
    alpha: float = 0.5  # weight of CE; 1 - alpha goes to the KD term
    temperature: float = 1.0
    beta: float | None = None  # jsd / skew_kl mixing weight (default 0.5 / 0.1)
    lora_r: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.1
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    full_finetune: bool = False
    optimizer: str = "adamw"
    lr: float | None = None  # None: 2e-4 with LoRA, 2e-5 for full fine-tuning
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float | None = None  # None and no max_steps: 1 epoch
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_steps: int = 50
    logging_steps: int = 10
    save_steps: int = 100
    chunk_size: int = 1024  # answer tokens per chunk of the loss
    gradient_checkpointing: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    num_workers: int = 0
    resume: bool = False
    force: bool = False  # write into a non-empty --out of someone else's (never overwriting)
    # on-policy distillation (`--on-policy`, see primekd.distill.onpolicy and docs/distill.md)
    on_policy: bool = False
    teacher: str | None = None  # the scoring teacher; None: the student's base model
    strategy: str = "ground_truth"  # the teacher's priming strategy when it scores
    strategies_file: str | None = None
    lmbda: float = 1.0  # on-policy share of each round's sequences (rest: --teacher-store)
    rounds: int = 4
    round_size: int = 16  # sequences' questions per round (x samples_per_question)
    samples_per_question: int = 1
    rollout_temperature: float = 1.0
    rollout_max_new_tokens: int = 256
    rollout_stop_at_answer: bool = False  # cut rollouts after the final-answer line (+ EOS)
    top_k: int = 20  # the teacher's top-k per student token (a --teacher-store's own k)
    engine: str = "hf"  # rollouts and scoring: hf (this process) or vllm
    engine_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def load_distill_config(path: str | Path, **overrides: Any) -> DistillConfig:
    """A `DistillConfig` from a YAML file of field names, with keyword overrides on top."""
    path = Path(path)
    values = read_yaml(path, "config file") or {}
    if not isinstance(values, dict):
        raise PrimekdError(f"{path} must be a mapping of DistillConfig fields")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(values, source=str(path))


def config_from_dict(values: dict[str, Any], source: str = "config") -> DistillConfig:
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PrimekdError(f"{source}: unknown distill option(s) {', '.join(unknown)}"
                           f"{did_you_mean(unknown[0], names)}; known: {', '.join(sorted(names))}")
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = _split_modules(values["target_modules"])
    return DistillConfig(**values)


def _split_modules(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def check_config(config: DistillConfig) -> None:
    """Refuse invalid combinations before anything heavy is loaded."""
    from primekd.core.validate import check_distill_types, device
    from primekd.distill.kd_loss import DIVERGENCES, resolve_beta

    def bad(message: str) -> None:
        raise PrimekdError(message)

    check_distill_types(config)
    device(config.device)

    if not config.out:
        bad("--out is required: the directory for the adapter, logs and checkpoints")
    if config.objective not in OBJECTIVES:
        bad(f"--objective must be one of {', '.join(OBJECTIVES)}, not {config.objective!r}")
    if config.on_policy:
        _check_on_policy(config)
    elif config.objective == "kd" and not config.teacher_store:
        bad("--objective kd needs --teacher-store DIR (from `primekd teach`); to train on "
            "GSM8K references instead use --objective sft --data train")
    if config.keep not in KEEP:
        bad(f"--keep must be one of {', '.join(KEEP)}, not {config.keep!r}")
    if config.teacher_store and config.data and not config.on_policy:
        bad("give either --teacher-store or --data, not both")
    if config.teacher_store:
        from primekd.teach.store import store_directories

        store_directories(config.teacher_store)  # each exists; a glob matches something
    if config.divergence not in DIVERGENCES:
        bad(f"--divergence must be one of {', '.join(DIVERGENCES)}, not {config.divergence!r}")
    try:
        resolve_beta(config.divergence, config.beta)
    except ValueError as e:
        bad(f"--beta: {e}")
    for name in ("alpha", "temperature", "beta", "lora_dropout", "lr", "weight_decay",
                 "warmup_ratio", "epochs", "max_grad_norm"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            bad(f"--{name.replace('_', '-')} must be a finite number, not {value!r}")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        bad(f"--warmup-ratio must be in [0, 1], got {config.warmup_ratio}")
    if config.weight_decay < 0 or config.max_grad_norm < 0:
        bad("--weight-decay and --max-grad-norm must not be negative")
    if not 0.0 <= config.alpha <= 1.0:
        bad(f"--alpha must be in [0, 1], got {config.alpha}")
    if config.temperature <= 0:
        bad(f"--temperature must be positive, got {config.temperature}")
    if config.epochs is not None and config.max_steps is not None:
        bad("give --epochs or --max-steps, not both")
    if config.epochs is not None and config.epochs <= 0:
        bad("--epochs must be positive")
    if config.max_steps is not None and config.max_steps < 1:
        bad("--max-steps must be at least 1")
    if config.optimizer not in OPTIMIZERS:
        bad(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {config.optimizer!r}")
    if config.scheduler not in SCHEDULERS:
        bad(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {config.scheduler!r}")
    for name in ("batch_size", "grad_accum", "max_length", "eval_steps", "logging_steps",
                 "save_steps", "chunk_size"):
        if getattr(config, name) < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1")
    if config.lora_r < 1 and not config.full_finetune:
        bad("--lora-r must be at least 1")
    if not 0.0 <= config.lora_dropout < 1.0:
        bad("--lora-dropout must be in [0, 1)")
    if config.val_size < 0:
        bad("--val-size must not be negative")
    if config.lr is not None and config.lr <= 0:
        bad("--lr must be positive")
    if config.dtype not in (None, "float32", "bfloat16", "float16"):
        bad("--dtype must be float32, bfloat16 or float16")
    if config.device not in (None, "cpu", "cuda") and not str(config.device).startswith("cuda"):
        bad("--device must be cpu or cuda")


def _check_on_policy(config: DistillConfig) -> None:
    """The on-policy options (`--on-policy`)."""
    from primekd.engines import EngineSpec

    def bad(message: str) -> None:
        raise PrimekdError(message)

    if config.objective != "kd":
        bad("--on-policy trains with --objective kd (the teacher scores the student's tokens)")
    if not isinstance(config.lmbda, int | float) or not 0.0 <= config.lmbda <= 1.0:
        bad(f"--lmbda must be in [0, 1], got {config.lmbda!r}")
    if config.lmbda < 1.0 and not config.teacher_store:
        bad("--lmbda below 1 mixes in off-policy rows: give --teacher-store DIR")
    for name in ("rounds", "round_size", "samples_per_question", "rollout_max_new_tokens",
                 "top_k"):
        if getattr(config, name) < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1")
    if config.rollout_temperature < 0:
        bad("--rollout-temperature must not be negative (0 means greedy)")
    if config.samples_per_question > 1 and config.rollout_temperature == 0:
        bad("several samples per question need sampling: --rollout-temperature above 0")
    if config.val_size:
        bad("--on-policy has no validation split: use --val-size 0")
    if config.max_steps is not None or config.epochs is not None:
        bad("--on-policy trains one pass over each round's sequences (--rounds x "
            "--round-size): drop --max-steps/--epochs")
    if config.full_finetune:
        bad("--on-policy trains a LoRA adapter (the self-teacher is the base model without "
            "it); drop --full-finetune")
    EngineSpec(config.engine, None, dict(config.engine_options or {})).check()
    from primekd.teach.priming import get_strategy

    get_strategy(config.strategy, config.strategies_file)
