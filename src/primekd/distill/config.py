"""The options of `primekd distill` as a dataclass, read from YAML and checked.

Kept apart from `primekd.distill.trainer` so that the CLI, `primekd run` and `primekd tune` can
build and validate configs without importing torch and transformers (seconds of start-up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from primekd.core.errors import PrimekdError
from primekd.core.io import read_yaml
from primekd.core.models import BUNDLED_ALIAS
from primekd.core.options import check, force_field, from_mapping, option
from primekd.engines import engine_field, engine_options_field, teacher_engine_options_field

OBJECTIVES = ("kd", "sft")
KEEP = ("all", "correct")  # which teacher answers a student trains on (rejection sampling)
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
XTOK_LOSSES = ("uld", "mapped")  # primekd.distill.xtok_loss (kept here: no torch import)


def _split_modules(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _one_or_many(stores: list[str]) -> str | list[str]:
    return stores[0] if len(stores) == 1 else stores


_ON_POLICY = "On-policy: "


@dataclass
class DistillConfig:
    """Every option of `primekd distill` (YAML keys of `--config` are these field names)."""

    out: str = option("", "Output directory: adapter, distill_config.yaml, "
                      "train_log.jsonl/.csv, summary.json, checkpoints/.",
                      flags=("--out", "-o"), set_by="experiment", run_only=True)
    student: str = option(BUNDLED_ALIAS, "Student model: a model alias (`primekd models` lists "
                          "them), a HF directory, a .gguf file or a hub id",
                          flags=("--student", "-m"), set_by="experiment")
    teacher_store: str | list[str] | None = option(
        None, "Teacher store directory written by `primekd teach`; repeat it for the shards "
        "of a `teach --shard i/n` run, or give a glob (quoted: 'teacher/shard-*'): the shards "
        "are merged.", flags=("--teacher-store", "-s"), cli_type=list[str], parse=_one_or_many,
        set_by="experiment")
    allow_partial: bool = option(
        False, "Train on what an unfinished teacher store (a stopped `teach`) or a shard set "
        "with shards missing holds; the summary and the run report count the answers used of "
        "those planned. Without it such a store is refused, naming the command that "
        "finishes it.", default_text="off")
    objective: str = option("kd", "kd: CE on the teacher's answer tokens plus a divergence to "
                            "its distributions (needs --teacher-store); sft: CE only, on the "
                            "teacher's text or, without a store, on GSM8K references (--data)",
                            set_by="experiment", choices=OBJECTIVES)
    data: str | None = option(None, "For --objective sft without a store, and the questions of "
                              "--on-policy rollouts: train, test, test_socratic, or a JSONL "
                              "file with question and answer", default_text="train",
                              set_by="experiment")
    limit: int | None = option(None, "Use only the first N questions (by id).",
                               set_by="experiment", ge=1)
    keep: str = option("all", "all, or correct: train only on the teacher answers the store "
                       "graded correct (rejection sampling); references (sft without a store) "
                       "are correct by definition", choices=KEEP)
    val_size: int = option(0, "Questions held out of training for the validation loss, every "
                           "--eval-steps", ge=0)
    prompt: str | None = option(None, "Student prompt template (Jinja text with "
                                "{{ question }}, or a file); default: the zero-shot template "
                                "`primekd eval` uses.")
    divergence: str = option("reverse_kl", "forward_kl, reverse_kl, jsd, skew_kl or tvd")
    alpha: float = option(0.5, "Weight of CE; the divergence gets 1 - alpha. 1 = "
                          "sequence-level KD (no distributions)", ge=0, le=1)
    temperature: float = option(1.0, "Softening temperature T of the KD term (scaled by T^2)",
                                flags=("--temperature", "-t"), gt=0)
    beta: float | None = option(None, "Mixing weight of jsd (default 0.5) and skew_kl "
                                "(default 0.1).")
    xtok_loss: str = option("uld", "With a teacher store of another tokenizer: uld (sorted "
                            "probabilities, no vocabulary mapping) or mapped (--divergence "
                            "over teacher tokens with an identical student token, uld over "
                            "the rest); see docs/distill.md", choices=XTOK_LOSSES)
    lora_r: int = option(4, "LoRA rank")
    lora_alpha: int = option(8, "LoRA alpha", ge=1)
    lora_dropout: float = option(0.1, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] = option(
        help="Comma-separated module names for LoRA, or all-linear",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], cli_type=str,
        parse=_split_modules)
    full_finetune: bool = option(False, "Train all weights instead of a LoRA adapter",
                                 flags=("--full-finetune/--lora",), default_text="--lora")
    optimizer: str = option("adamw", "adamw or sgd", choices=OPTIMIZERS)
    lr: float | None = option(None, "Peak learning rate", default_text="2e-4 with LoRA, 2e-5 "
                              "full", gt=0)
    weight_decay: float = option(0.0, "Weight decay", default_text="0.0", ge=0)
    scheduler: str = option("cosine", "cosine, linear or constant", choices=SCHEDULERS)
    warmup_ratio: float = option(0.03, "Fraction of steps for linear warmup", ge=0, le=1)
    epochs: float | None = option(None, "Passes over the training set (not with --max-steps)",
                                  default_text="1", gt=0)
    max_steps: int | None = option(None, "Optimizer steps (not with --epochs).", ge=1)
    batch_size: int = option(4, "Sequences per device per step", flags=("--batch-size", "-b"), ge=1)
    grad_accum: int = option(1, "Gradient accumulation steps", ge=1)
    max_length: int = option(1024, "Longest prompt + answer in tokens (answers are cut)", ge=2)
    max_grad_norm: float = option(1.0, "Gradient clipping", ge=0)
    seed: int = option(0, "Seed for LoRA init, data order, --val-size split",
                       default_text="0")
    eval_steps: int = option(50, "Validation every N steps", ge=1)
    logging_steps: int = option(10, "Log every N steps", ge=1, run_only=True)
    save_steps: int = option(100, "Checkpoint every N steps (for --resume)", ge=1, run_only=True)
    chunk_size: int = option(1024, "Answer tokens per chunk of the loss (bounds memory)", ge=1)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save "
                                          "memory", default_text="off")
    device: str | None = option(None, "cpu or cuda", default_text="cuda if available")
    dtype: str | None = option(None, "float32, bfloat16 or float16",
                               default_text="bfloat16 on CUDA, float32 on CPU", choices=DTYPES)
    num_workers: int = option(0, "Data loader workers", default_text="0", ge=0, run_only=True)
    resume: bool = option(False, "Continue a killed run in --out from its last checkpoint.",
                          set_by="experiment", run_only=True)
    force: bool = force_field(run_only=True)
    # on-policy distillation (`--on-policy`, see primekd.distill.onpolicy and docs/distill.md)
    on_policy: bool = option(
        False, "On-policy distillation: in rounds the student answers training questions, "
        "the teacher scores its tokens under --strategy, the student trains on them "
        "(default: --off-policy, a teacher store's answers). --alpha then defaults to 0.",
        flags=("--on-policy/--off-policy",), set_by="experiment")
    teacher: str | None = option(None, _ON_POLICY + "the model that scores the student's "
                                 "answers", default_text="the student's base model, without "
                                 "the adapter", set_by="experiment")
    strategy: str = option("ground_truth", _ON_POLICY + "the teacher's priming strategy",
                           set_by="on_policy")
    strategies_file: str | None = option(None, _ON_POLICY + "YAML file of custom strategies.",
                                         set_by="experiment")
    lmbda: float = option(1.0, _ON_POLICY + "share of each round's sequences that are the "
                          "student's own; the rest come from --teacher-store",
                          set_by="on_policy", ge=0, le=1)
    rounds: int = option(4, _ON_POLICY + "rounds", set_by="on_policy", ge=1)
    round_size: int = option(16, _ON_POLICY + "questions per round, times "
                             "--samples-per-question sequences", set_by="on_policy", ge=1)
    samples_per_question: int = option(1, _ON_POLICY + "rollouts per question",
                                       set_by="on_policy", ge=1)
    rollout_temperature: float = option(1.0, _ON_POLICY + "sampling temperature of the "
                                        "student's rollouts, 0 = greedy", set_by="on_policy", ge=0)
    rollout_max_new_tokens: int = option(256, _ON_POLICY + "longest rollout in tokens",
                                         set_by="on_policy", ge=1)
    rollout_stop_at_answer: bool = option(
        False, _ON_POLICY + "end each rollout at its final-answer line, then EOS (scored by "
        "the teacher like every token, so the student learns to stop)", default_text="off",
        set_by="on_policy")
    top_k: int = option(20, _ON_POLICY + "teacher log-probs kept per student token",
                        default_text="20; with --teacher-store, the store's k",
                        set_by="on_policy", ge=1)
    engine: str = engine_field(_ON_POLICY + "hf (in this process) or vllm for rollouts and "
                               "scoring")
    engine_options: dict[str, Any] = engine_options_field(
        _ON_POLICY + "engine option key=value of the student's rollouts, and of the "
        "teacher's scoring unless --teacher-engine-option is given (repeatable; vllm "
        "options, or the hf engine's device_map/max_memory; see docs/engines.md).")
    teacher_engine_options: dict[str, Any] | None = teacher_engine_options_field(
        _ON_POLICY + "engine option key=value of the teacher's scoring instead of "
        "--engine-option (repeat each one it needs), e.g. tensor_parallel_size=8 or "
        "device_map=auto.")

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
    values = dict(values)
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = _split_modules(values["target_modules"])
    return from_mapping(DistillConfig, values, source, "distill")


def check_config(config: DistillConfig) -> None:
    """Refuse invalid values and combinations before anything heavy is loaded."""
    from primekd.core.validate import device
    from primekd.distill.kd_loss import DIVERGENCES, resolve_beta

    def bad(message: str) -> None:
        raise PrimekdError(message)

    check(config)  # types, ranges and choices, as the fields declare them
    device(config.device)
    if not config.out:
        bad("--out is required: the directory for the adapter, logs and checkpoints")
    if config.on_policy:
        _check_on_policy(config)
    elif config.objective == "kd" and not config.teacher_store:
        bad("--objective kd needs --teacher-store DIR (from `primekd teach`); to train on "
            "GSM8K references instead use --objective sft --data train")
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
    if config.epochs is not None and config.max_steps is not None:
        bad("give --epochs or --max-steps, not both")
    if config.lora_r < 1 and not config.full_finetune:
        bad("--lora-r must be at least 1")
    if config.teacher_store and (not config.on_policy or config.lmbda < 1.0):
        from primekd.teach.store import store_directories, training_coverage

        # the store is read: is all of it there?
        training_coverage(store_directories(config.teacher_store), config.allow_partial)


def teacher_options(config: DistillConfig) -> dict[str, Any]:
    """The on-policy teacher's engine options (its own, else the student's)."""
    chosen = config.teacher_engine_options
    return dict(config.engine_options if chosen is None else chosen)


def _check_on_policy(config: DistillConfig) -> None:
    """The on-policy options (`--on-policy`)."""
    from primekd.engines import EngineSpec

    def bad(message: str) -> None:
        raise PrimekdError(message)

    if config.objective != "kd":
        bad("--on-policy trains with --objective kd (the teacher scores the student's tokens)")
    if config.lmbda < 1.0 and not config.teacher_store:
        bad("--lmbda below 1 mixes in off-policy rows: give --teacher-store DIR")
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
    EngineSpec(config.engine, None, teacher_options(config)).check()
    from primekd.teach.priming import get_strategy

    get_strategy(config.strategy, config.strategies_file)
