"""`primekd distill`: train a student adapter from a teacher store (KD) or references (SFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from primekd.cli.app import app, console
from primekd.core.io import dumps
from primekd.distill.config import DistillConfig, config_from_dict, load_distill_config

_D = DistillConfig()


def _opt(*names: str, help: str) -> Any:
    return typer.Option(None, *names, help=help, show_default=False)


@app.command("distill")
def distill_command(
    config_file: Path = _opt("--config", help="YAML file whose keys are option names "
                             "(snake_case, e.g. lora_r); options given here override it."),
    student: str = _opt("--student", "-m", help="Student model: the bundled alias, a HF "
                        f"directory, a .gguf file or a hub id (default: {_D.student})."),
    teacher_store: list[str] = _opt("--teacher-store", "-s", help="Teacher store directory "
                                    "written by `primekd teach`; repeat it for the shards "
                                    "of a `teach --shard i/n` run, or give a glob "
                                    "(quoted: 'teacher/shard-*'): the shards are merged."),
    out: str = _opt("--out", "-o", help="Output directory: adapter, distill_config.yaml, "
                    "train_log.jsonl/.csv, summary.json, checkpoints/."),
    objective: str = _opt("--objective", help="kd: CE on the teacher's answer tokens plus a "
                          "divergence to its distributions (needs --teacher-store); sft: CE "
                          "only, on the teacher's text or, without a store, on GSM8K "
                          f"references (--data) (default: {_D.objective})."),
    data: str = _opt("--data", help="For --objective sft without a store, and the questions "
                     "of --on-policy rollouts: train, test, test_socratic, or a JSONL file "
                     "with question and answer (default: train)."),
    limit: int = _opt("--limit", help="Use only the first N questions (by id)."),
    keep: str = _opt("--keep", help="all, or correct: train only on the teacher answers the "
                     "store graded correct (rejection sampling); references (sft without a "
                     f"store) are correct by definition (default: {_D.keep})."),
    val_size: int = _opt("--val-size", help="Questions held out of training for the "
                         f"validation loss, every --eval-steps (default: {_D.val_size})."),
    prompt: str = _opt("--prompt", help="Student prompt template (Jinja text with "
                       "{{ question }}, or a file); default: the zero-shot template "
                       "`primekd eval` uses."),
    divergence: str = _opt("--divergence", help="forward_kl, reverse_kl, jsd, skew_kl or tvd "
                           f" (default: {_D.divergence})."),
    alpha: float = _opt("--alpha", help="Weight of CE; the divergence gets 1 - alpha. 1 = "
                        f"sequence-level KD (no distributions) (default: {_D.alpha})."),
    temperature: float = _opt("--temperature", "-t", help="Softening temperature T of the "
                              f"KD term (scaled by T^2) (default: {_D.temperature})."),
    beta: float = _opt("--beta", help="Mixing weight of jsd (default 0.5) and skew_kl "
                       "(default 0.1)."),
    lora_r: int = _opt("--lora-r", help=f"LoRA rank (default: {_D.lora_r})."),
    lora_alpha: int = _opt("--lora-alpha", help=f"LoRA alpha (default: {_D.lora_alpha})."),
    lora_dropout: float = _opt("--lora-dropout", help="LoRA dropout "
                               f" (default: {_D.lora_dropout})."),
    target_modules: str = _opt("--target-modules", help="Comma-separated module names for "
                               "LoRA, or all-linear (default: q_proj,k_proj,v_proj,o_proj)."),
    full_finetune: bool = typer.Option(None, "--full-finetune/--lora", show_default=False,
                                       help="Train all weights instead of a LoRA adapter "
                                       " (default: --lora)."),
    optimizer: str = _opt("--optimizer", help=f"adamw or sgd (default: {_D.optimizer})."),
    lr: float = _opt("--lr", help="Peak learning rate (default: 2e-4 with LoRA, 2e-5 full)."),
    weight_decay: float = _opt("--weight-decay", help="Weight decay "
                               f" (default: {_D.weight_decay})."),
    scheduler: str = _opt("--scheduler", help="cosine, linear or constant "
                          f" (default: {_D.scheduler})."),
    warmup_ratio: float = _opt("--warmup-ratio", help="Fraction of steps for linear warmup "
                               f" (default: {_D.warmup_ratio})."),
    epochs: float = _opt("--epochs", help="Passes over the training set (not with "
                         "--max-steps) (default: 1)."),
    max_steps: int = _opt("--max-steps", help="Optimizer steps (not with --epochs)."),
    batch_size: int = _opt("--batch-size", "-b", help="Sequences per device per step "
                           f" (default: {_D.batch_size})."),
    grad_accum: int = _opt("--grad-accum", help="Gradient accumulation steps "
                           f" (default: {_D.grad_accum})."),
    max_length: int = _opt("--max-length", help="Longest prompt + answer in tokens (answers "
                           f"are cut) (default: {_D.max_length})."),
    max_grad_norm: float = _opt("--max-grad-norm", help="Gradient clipping "
                                f" (default: {_D.max_grad_norm})."),
    seed: int = _opt("--seed", help=f"Seed for LoRA init, data order, --val-size split "
                     f" (default: {_D.seed})."),
    eval_steps: int = _opt("--eval-steps", help="Validation every N steps "
                           f" (default: {_D.eval_steps})."),
    logging_steps: int = _opt("--logging-steps", help="Log every N steps "
                              f" (default: {_D.logging_steps})."),
    save_steps: int = _opt("--save-steps", help="Checkpoint every N steps (for --resume) "
                           f" (default: {_D.save_steps})."),
    chunk_size: int = _opt("--chunk-size", help="Answer tokens per chunk of the loss "
                           f"(bounds memory) (default: {_D.chunk_size})."),
    gradient_checkpointing: bool = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", show_default=False,
        help="Recompute activations in backward to save memory (default: off)."),
    device: str = _opt("--device", help="cpu or cuda (default: cuda if available)."),
    dtype: str = _opt("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on "
                      "CUDA, float32 on CPU)."),
    num_workers: int = _opt("--num-workers", help="Data loader workers (default: 0)."),
    resume: bool = typer.Option(None, "--resume/--no-resume", show_default=False,
                                help="Continue a killed run in --out from its last "
                                "checkpoint."),
    force: bool = typer.Option(None, "--force", show_default=False,
                               help="Write into a non-empty --out that primekd did not make, "
                               "beside the files there (never overwriting or deleting them)."),
    on_policy: bool = typer.Option(
        None, "--on-policy/--off-policy", show_default=False,
        help="On-policy distillation: in rounds the student answers training questions, the "
        "teacher scores its tokens under --strategy, the student trains on them (default: "
        "--off-policy, a teacher store's answers). --alpha then defaults to 0."),
    teacher: str = _opt("--teacher", help="On-policy: the model that scores the student's "
                        "answers (default: the student's base model, without the adapter)."),
    strategy: str = _opt("--strategy", help="On-policy: the teacher's priming strategy "
                         f"(default: {_D.strategy})."),
    strategies_file: str = _opt("--strategies-file", help="On-policy: YAML file of custom "
                                "strategies."),
    lmbda: float = _opt("--lmbda", help="On-policy: share of each round's sequences that are "
                        "the student's own; the rest come from --teacher-store "
                        f"(default: {_D.lmbda})."),
    rounds: int = _opt("--rounds", help=f"On-policy: rounds (default: {_D.rounds})."),
    round_size: int = _opt("--round-size", help="On-policy: questions per round, times "
                           f"--samples-per-question sequences (default: {_D.round_size})."),
    samples_per_question: int = _opt("--samples-per-question", help="On-policy: rollouts per "
                                     f"question (default: {_D.samples_per_question})."),
    rollout_temperature: float = _opt("--rollout-temperature", help="On-policy: sampling "
                                      "temperature of the student's rollouts, 0 = greedy "
                                      f"(default: {_D.rollout_temperature})."),
    rollout_max_new_tokens: int = _opt("--rollout-max-new-tokens", help="On-policy: longest "
                                       "rollout in tokens "
                                       f"(default: {_D.rollout_max_new_tokens})."),
    rollout_stop_at_answer: bool = typer.Option(
        None, "--rollout-stop-at-answer/--no-rollout-stop-at-answer", show_default=False,
        help="On-policy: end each rollout at its final-answer line, then EOS (scored by the "
        "teacher like every token, so the student learns to stop) (default: off)."),
    top_k: int = _opt("--top-k", help="On-policy: teacher log-probs kept per student token "
                      f"(default: {_D.top_k}; with --teacher-store, the store's k)."),
    engine: str = _opt("--engine", help="On-policy: hf (in this process) or vllm for "
                       f"rollouts and scoring (default: {_D.engine})."),
    engine_option: list[str] = _opt("--engine-option", help="On-policy: vllm engine option "
                                    "key=value (repeatable; see docs/engines.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a student (LoRA by default) from a teacher store or GSM8K references.

    Loss: alpha * CE(answer tokens) + (1 - alpha) * T^2 * D(teacher || student), with the
    teacher's top-k distribution plus a rest bucket. Run data-parallel with
    `accelerate launch --multi_gpu --num_processes N $(which primekd) distill ...`.
    """
    given = {k: v for k, v in locals().items()
             if v is not None and k not in ("config_file", "as_json", "quiet")}
    if given.get("engine_option"):
        from primekd.engines import parse_options

        given["engine_options"] = parse_options(given.pop("engine_option"))
    given.pop("engine_option", None)
    if given.get("on_policy") and "alpha" not in given and config_file is None:
        given["alpha"] = 0.0  # on-policy: the divergence alone (CE on own samples self-trains)
    stores = given.get("teacher_store")
    if isinstance(stores, list):
        given["teacher_store"] = stores[0] if len(stores) == 1 else stores
    if isinstance(given.get("target_modules"), str):
        given["target_modules"] = [m.strip() for m in given["target_modules"].split(",")
                                   if m.strip()]
    config = (load_distill_config(config_file, **given) if config_file
              else config_from_dict(given, source="options"))
    from primekd.core.outdir import check_out
    from primekd.distill.config import check_config

    check_config(config)  # before the seconds it takes to import torch and transformers
    check_out(config.out, "distill", config.force)
    from primekd.distill import distill  # torch and transformers: load only to train

    result = distill(config, progress=not quiet)
    _leave_process_group()
    if as_json:
        print(dumps(result.summary, indent=2, default=str))
        return
    _print_summary(result.summary)


def _leave_process_group() -> None:
    """Under `accelerate launch`, destroy the process group before the interpreter exits:
    left to exit-time teardown, gloo's worker threads can abort the process ("terminate
    called without an active exception", SIGABRT) after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _kept(data: dict[str, Any]) -> str | None:
    if data.get("keep") != "correct":
        return None
    return f"{data.get('kept_rows')}/{data.get('store_rows')} (graded correct)"


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"distilled into {summary['out']}", show_header=False)
    rows = [
        ("steps", summary["steps"]),
        ("final train loss", summary["final_train_loss"]),
        ("val loss before", summary["val_loss_before"]),
        ("val loss after", summary["val_loss_after"]),
        ("tokens", summary["tokens"]),
        ("answers kept", _kept(summary.get("data", {}))),
        ("tokens/s", summary["tokens_per_s"]),
        ("trainable params", summary["trainable_params"]),
        ("wall time (s)", summary["wall_time_s"]),
    ]
    for name, value in rows:
        if value is not None:
            table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
