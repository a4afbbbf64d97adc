"""Train a student (LoRA or full) from a teacher store (white-box KD) or from references (SFT).

Pieces, each usable on its own (the options are `primekd.distill.config`, the data
`primekd.distill.data`):

- `KDTrainer(transformers.Trainer)`: the custom loss ``alpha * CE + (1 - alpha) * T^2 * D``
  (see `primekd.distill.kd_loss`), CE/KD parts and tokens/s in the logs, and a KD validation loss.
- `build_student`, `training_arguments`: the model (LoRA or full) and the Trainer's arguments.
- `distill_off_policy(config, callbacks)`: wires them together and writes the output directory.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from primekd.core import diskspace, options, outdir
from primekd.core.errors import PrimekdError
from primekd.core.io import atomic_write, atomic_write_text, dumps, write_json
from primekd.core.models import (
    default_device,
    default_dtype,
    load_model,
    load_tokenizer,
    resolve,
)
from primekd.core.progress import progress_bar
from primekd.distill.compat import vocabulary_rows
from primekd.distill.config import OPTIMIZERS, DistillConfig, check_config
from primekd.distill.data import Item, KDCollator, build_datasets, check_vocabulary
from primekd.distill.footprint import output_need, planned_trainable
from primekd.distill.kd_loss import kd_loss_parts
from primekd.distill.xtok_loss import xtok_loss_parts

CONFIG_FILE, SUMMARY_FILE = "distill_config.yaml", "summary.json"
LOG_JSONL, LOG_CSV = "train_log.jsonl", "train_log.csv"
CHECKPOINTS = "checkpoints"
RUN_TOTALS = "primekd_run_totals.json"  # in each checkpoint: whole-run loss sum and tokens
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the bundled GGUF comes from
LOG_COLUMNS = ("step", "epoch", "loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s",
               "val_loss", "val_ce", "val_kd")


@dataclass
class DistillResult:
    out: Path
    summary: dict[str, Any]
    log_history: list[dict[str, Any]]

    @property
    def val_loss_before(self) -> float | None:
        return self.summary.get("val_loss_before")

    @property
    def val_loss_after(self) -> float | None:
        return self.summary.get("val_loss_after")


# ---------------------------------------------------------------- trainer


@dataclass
class KDSettings:
    alpha: float = 0.5
    divergence: str = "reverse_kl"
    temperature: float = 1.0
    beta: float | None = None
    chunk_size: int = 1024
    xtok_loss: str | None = None  # a teacher of another tokenizer: uld or mapped

    @classmethod
    def of(cls, config: DistillConfig, cross_tokenizer: bool = False) -> KDSettings:
        return cls(config.alpha, config.divergence, config.temperature, config.beta,
                   config.chunk_size, config.xtok_loss if cross_tokenizer else None)


class _HeadTap:
    """A forward pre-hook on the output projection that keeps its input (the final hidden
    states) and hands it an empty sequence instead, so the model never builds (B, S, V)
    logits: the loss projects only the answer positions, chunk by chunk."""

    def __init__(self, head: torch.nn.Module):
        self.head, self.armed, self.hidden = head, False, None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not self.armed:
            return None
        self.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.head, "weight", None)
        if weight is not None and hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return self.head(hidden)


def _can_tap(model: Any, trainer: Trainer) -> bool:
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return False  # sharded head weights are only whole inside the model's forward
    return isinstance(getattr(model, "get_output_embeddings", lambda: None)(), torch.nn.Module)


def tap_matches_forward(model: Any, tap: _HeadTap, device: Any, length: int = 8) -> bool:
    """Whether projecting the tapped hidden states gives the model's own logits on one short
    batch. Models that scale or cap logits after the head (Gemma's softcapping, Cohere's
    logit_scale, Granite's logits_scaling, ...) differ, and then train on full logits."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(length, device=device) * 7 + 1).remainder(vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            tap.armed = True
            try:
                model(input_ids=ids, use_cache=False)
                hidden = tap.hidden
            finally:
                tap.armed, tap.hidden = False, None
            tapped = tap.project(hidden).float()
    finally:
        model.train(was_training)
    scale = float(full.abs().max()) or 1.0
    return tapped.shape == full.shape and bool(
        torch.allclose(tapped, full, rtol=1e-3, atol=1e-3 * scale))


class KDTrainer(Trainer):
    """`transformers.Trainer` with the KD objective, CE/KD parts in the logs and a KD
    validation loss (`eval_loss`, `eval_ce`, `eval_kd`) that `on_evaluate` callbacks see."""

    def __init__(self, *args: Any, kd: KDSettings, **kwargs: Any):
        one_gpu_per_process(kwargs["args"] if "args" in kwargs else args[1])
        super().__init__(*args, **kwargs)
        self.kd = kd
        # Ask Trainer for the token count of the whole accumulated batch (all processes), so
        # the loss is a per-token mean that does not depend on how the batch is split.
        self.model_accepts_loss_kwargs = True
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._tap = _HeadTap(unwrapped.get_output_embeddings()) if _can_tap(unwrapped, self) \
            else None
        if self._tap is not None and not tap_matches_forward(unwrapped, self._tap,
                                                             self.args.device):
            self._tap.handle.remove()
            self._tap = None
        self._reset_meter()
        # Whole-run totals (loss summed over optimizer steps, input tokens), carried across
        # --resume in each checkpoint's RUN_TOTALS file (read by `train`).
        self._run_totals = torch.zeros(2, dtype=torch.float64)
        self.resumed_totals = (0.0, 0)
        self.tokens_seen = 0

    def _reset_meter(self) -> None:
        self._meter = torch.zeros(5, dtype=torch.float64)  # ce, kd, n_ce, n_kd, input tokens
        self._meter_since = time.perf_counter()

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        """Trainer's `train`, carrying the whole-run totals of the checkpoint it resumes
        from, and with the progress bar stopped however training ends."""
        self.resumed_totals = _resumed_totals(resume_from_checkpoint)
        self.tokens_seen = self.resumed_totals[1]
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, _RichProgress):
                    callback.stop()

    def loss_parts(self, model: Any, inputs: dict[str, torch.Tensor]) -> Any:
        """Forward the student and return the `LossParts` sums of this batch."""
        model_inputs = {"input_ids": inputs["input_ids"],
                        "attention_mask": inputs["attention_mask"], "use_cache": False}
        if self._tap is not None:
            self._tap.armed = True
            try:
                model(**model_inputs)
                features, head = self._tap.hidden, self._tap.project
            finally:
                self._tap.armed, self._tap.hidden = False, None
        else:
            features, head = model(**model_inputs).logits, None
        targets = inputs["labels"][:, 1:]
        selected = targets != -100  # the logit at position t predicts the token at t + 1
        teacher = {}
        if "topk_ids" in inputs and self.kd.alpha < 1.0:
            teacher = {"topk_ids": inputs["topk_ids"][:, 1:][selected],
                       "topk_logprobs": inputs["topk_logprobs"][:, 1:][selected],
                       "kd_mask": inputs["kd_mask"][:, 1:][selected]}
        loss, extra = kd_loss_parts, {}
        if teacher and self.kd.xtok_loss:
            loss, extra = xtok_loss_parts, {"loss": self.kd.xtok_loss}
        return loss(
            features[:, :-1][selected], targets[selected], head=head, **teacher, **extra,
            alpha=self.kd.alpha if teacher else 1.0, kind=self.kd.divergence,
            temperature=self.kd.temperature, beta=self.kd.beta, chunk_size=self.kd.chunk_size)

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        parts = self.loss_parts(model, inputs)
        if num_items_in_batch is None:
            loss = parts.loss / max(parts.n_ce, 1)
        else:
            loss = parts.loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients
        if model.training:
            self._stop_if_not_finite(loss.detach())
            tokens = int(inputs["attention_mask"].sum())
            self._run_totals[1] += tokens
            self._meter += torch.tensor([float(parts.ce_sum.detach()), float(parts.kd_sum.detach()),
                                         parts.n_ce, parts.n_kd, tokens], dtype=torch.float64)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss, on every process at once (one process alone raising
        would leave the others waiting in the next collective)."""
        bad = torch.tensor([float(not torch.isfinite(loss).all())], dtype=torch.float64)
        if self._reduce(bad)[0] > 0:
            raise PrimekdError(
                f"step {self.state.global_step + 1}: the training loss is {float(loss)} "
                "(on this or another process): stopped, no adapter saved. Likely cause: a "
                "learning rate or --temperature too high, or float16 overflow (use bfloat16)")

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """Trainer's global gradient norm (the same on every process), checked: a NaN/inf
        gradient stops training. Not under fp16, whose loss scaler skips such steps."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(float(grad_norm)):
            raise PrimekdError(
                f"step {self.state.global_step + 1}: the gradient norm is {float(grad_norm)}: "
                "stopped, no adapter saved. Likely cause: a learning rate too high, or a "
                "numerical overflow in the model (try float32 or a smaller --lr)")
        return grad_norm

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._run_totals[0] += float(loss)
        return loss

    def run_totals(self) -> tuple[float, int]:
        """(loss summed over optimizer steps, input tokens) of the whole run, all processes,
        including the steps before a --resume."""
        loss, tokens = self._reduce(self._run_totals.clone()).tolist()
        loss /= self.accelerator.num_processes  # Trainer's step loss is the process mean
        return self.resumed_totals[0] + loss, self.resumed_totals[1] + int(tokens)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer's checkpoint, then RUN_TOTALS, written last: a checkpoint without it is
        half-written and never resumed from (`_last_checkpoint`). A full disk removes the
        half and says so: torch.save's own error does not."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            totals = self.run_totals()  # collective: every process is here
            if self.is_world_process_zero() and folder.is_dir():
                write_json(folder / RUN_TOTALS, {"loss_sum": totals[0], "tokens": totals[1]})
        except Exception as e:
            if not diskspace.looks_full(e, folder):
                raise
            if self.is_world_process_zero():
                shutil.rmtree(folder, ignore_errors=True)
            raise diskspace.as_full(e, folder) from e

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the CE/KD parts and throughput
            meter = self._reduce(self._meter)
            ce, kd, n_ce, n_kd, tokens = meter.tolist()
            elapsed = max(time.perf_counter() - self._meter_since, 1e-9)
            self.tokens_seen += int(tokens)
            logs["ce"] = ce / n_ce if n_ce else float("nan")
            if n_kd:
                logs["kd"] = kd / n_kd
            logs["tokens_per_s"] = tokens / elapsed
            logs["tokens_seen"] = self.tokens_seen
            self._reset_meter()
        super().log(logs, start_time)

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.reduce(values.to(self.args.device), "sum").cpu()

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean per-token validation loss (and its CE and KD parts) over the held-out set."""
        loader = self.get_eval_dataloader(eval_dataset)
        model = self._prepared_model()
        was_training = model.training
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        started = time.perf_counter()
        with torch.no_grad():
            for batch in loader:
                parts = self.loss_parts(model, self._without_padding(
                    self._prepare_inputs(batch), loader))
                sums += torch.tensor([float(parts.loss), float(parts.ce_sum),
                                      float(parts.kd_sum), parts.n_ce, parts.n_kd],
                                     dtype=torch.float64)
        model.train(was_training)
        self._meter_since += time.perf_counter() - started  # keep eval out of tokens/s
        loss, ce, kd, n_ce, n_kd = self._reduce(sums).tolist()
        metrics = {f"{metric_key_prefix}_loss": loss / max(n_ce, 1),
                   f"{metric_key_prefix}_ce": ce / max(n_ce, 1),
                   f"{metric_key_prefix}_runtime": time.perf_counter() - started}
        if n_kd:
            metrics[f"{metric_key_prefix}_kd"] = kd / n_kd
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics)
        return metrics

    def _without_padding(self, batch: dict[str, Any], loader: Any) -> dict[str, Any]:
        """The batch with accelerate's padding samples masked out of the loss: across
        processes the last batch of every process is filled up with samples repeated from the
        start (so that sharded forwards stay in step), which the sums would count twice. Of
        that last global batch, processes in order, the first `remainder` samples are real."""
        remainder = getattr(loader, "remainder", -1)
        if (self.accelerator.num_processes == 1 or remainder <= 0
                or not self.accelerator.gradient_state.end_of_dataloader):
            return batch
        rows = batch["labels"].shape[0]
        keep = max(0, remainder - self.accelerator.process_index * rows)
        if keep >= rows:
            return batch
        labels = batch["labels"].clone()
        labels[keep:] = -100  # no answer token of a padding sample is counted
        return {**batch, "labels": labels}

    def _prepared_model(self) -> Any:
        """The model as accelerate prepared it. FSDP and DeepSpeed place and shard it only in
        `train()` (until then Trainer leaves it on the CPU), so under them the validation
        before training runs at `on_train_begin` (`_ValidateAtStart`), never before."""
        if not self.accelerator._models:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                raise PrimekdError("internal: validation before the sharded model is prepared")
            self.model_wrapped = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        return self._wrap_model(self.model, training=False)


class _ValidateAtStart(TrainerCallback):
    """The validation loss before the first step, computed once `train()` has prepared
    (placed, sharded) the model: the only point where that works under FSDP and DeepSpeed."""

    def __init__(self, trainer: KDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.evaluate()  # logged at step 0; `_val_before` reads it from the history


class _RichProgress(TrainerCallback):
    """The optimizer-step bar, drawn with the same rich bar every other stage uses (not
    Trainer's tqdm), and without printing every log dict to stdout."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = progress_bar(True)
            self.bar.start()
            self.task = self.bar.add_task("training", total=state.max_steps,
                                          completed=state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class TrainLogWriter(TrainerCallback):
    """The Trainer's log history as train_log.jsonl and train_log.csv: one row per logging
    step (and per evaluation). A resumed run starts again from its checkpoint's history, so
    rows logged after that checkpoint are dropped."""

    def __init__(self, out: Path):
        self.jsonl, self.csv = out / LOG_JSONL, out / LOG_CSV

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        rows = [row for h in state.log_history if (row := log_row(h.get("step", 0), h))]
        atomic_write_text(self.jsonl, "".join(dumps(r) + "\n" for r in rows))
        atomic_write(self.csv, lambda tmp: self._write_csv(tmp, "w", rows))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
        if not state.is_world_process_zero or not logs:
            return
        row = log_row(state.global_step, logs)
        if row is None:
            return
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(dumps(row) + "\n")
        self._write_csv(self.csv, "a", [row])

    @staticmethod
    def _write_csv(path: Path, mode: str, rows: list[dict[str, Any]]) -> None:
        new = mode == "w" or not path.exists()
        with path.open(mode, encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)


def log_row(step: int, logs: dict[str, Any]) -> dict[str, Any] | None:
    """A Trainer log dict as a train-log row (None for logs that are neither train nor eval)."""
    if "loss" in logs:
        names = {"loss": "loss", "ce": "ce", "kd": "kd", "learning_rate": "lr",
                 "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s"}
    elif "eval_loss" in logs:
        names = {"eval_loss": "val_loss", "eval_ce": "val_ce", "eval_kd": "val_kd"}
    else:
        return None
    row: dict[str, Any] = {"step": step, "epoch": logs.get("epoch")}
    for key, name in names.items():
        if key in logs and logs[key] is not None:
            value = logs[key]
            row[name] = float(value) if not isinstance(value, int | float) else value
    return row


# ---------------------------------------------------------------- model


def _torch_dtype(config: DistillConfig, device: str) -> torch.dtype:
    if config.dtype == "float16" and config.full_finetune:
        return torch.float32  # fp16 autocast over fp32 weights: the scaler unscales fp32 grads
    if config.dtype:
        return getattr(torch, config.dtype)
    if config.full_finetune:
        return torch.float32  # full weights in fp32 (bf16 autocast on CUDA)
    return default_dtype(device)


def mixed_precision(config: DistillConfig, device: str) -> dict[str, bool]:
    """Trainer's autocast flags. float16 always trains under autocast with loss scaling
    (fp16=True): pure fp16 gradients underflow. LoRA's own weights stay float32 (peft)."""
    on_cuda = device.startswith("cuda")
    if config.dtype == "float16":
        if not on_cuda:
            raise PrimekdError("--dtype float16 needs CUDA (autocast with loss scaling); "
                               "on CPU use float32 or bfloat16")
        return {"fp16": True, "bf16": False}
    bf16 = on_cuda and config.dtype in (None, "bfloat16") and torch.cuda.is_bf16_supported()
    return {"fp16": False, "bf16": bf16}


def build_student(config: DistillConfig, device: str) -> Any:
    set_seed(config.seed)  # LoRA's random init
    # device None: where from_pretrained put it (meta on ranks > 0 under FSDP's
    # cpu_ram_efficient_loading, partitioned under ZeRO-3); Trainer/accelerate place it.
    model = load_model(config.student, device=None, dtype=_torch_dtype(config, device),
                       keep_placement=True)
    model.config.use_cache = False
    if config.full_finetune:
        model.train()
        return model
    targets: str | list[str] = config.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        names = _linear_names(model)
        raise PrimekdError(f"LoRA target modules {config.target_modules} not found in "
                           f"{config.student} ({e}); its linear layers: {', '.join(names)}; "
                           "pass them with --target-modules") from None
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    model.train()
    return model


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts of the whole model, also when ZeRO-3 has
    partitioned it (`ds_numel`) or FSDP2 sharded it (DTensor `numel` is the global size).
    Count before FSDP1 flattens the parameters (its shards hold only a slice)."""
    def size(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(size(p) for p in model.parameters())


def training_arguments(config: DistillConfig, out: Path, device: str, progress: bool,
                       has_val: bool) -> TrainingArguments:
    on_cuda = device.startswith("cuda")
    lr = config.lr if config.lr is not None else (2e-5 if config.full_finetune else 2e-4)
    epochs = config.epochs if config.epochs is not None else 1.0
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=lr,
        weight_decay=config.weight_decay,
        optim=OPTIMIZERS[config.optimizer],
        lr_scheduler_type=config.scheduler,
        **warmup_arguments(config.warmup_ratio),
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_val else "no",
        eval_steps=config.eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not on_cuda,
        **mixed_precision(config, device),
        **_checkpointing_args(config.gradient_checkpointing),
        ddp_find_unused_parameters=False,
        dataloader_num_workers=config.num_workers,
    )
    pin_device(args, device)
    return args


def one_gpu_per_process(args: TrainingArguments) -> None:
    """Train on one GPU per process. Without a distributed launch transformers takes every
    visible GPU (`n_gpu = torch.cuda.device_count()`) and wraps the model in nn.DataParallel:
    its replicas share the head tap (which then holds one replica's slice) and the batch is
    silently multiplied by the GPU count. More GPUs: `accelerate launch` (one process each)."""
    if args.n_gpu > 1:
        args._n_gpu = 1


def pin_device(args: TrainingArguments, device: str) -> None:
    """Honour `--device cuda:N` in a single process: transformers picks cuda:0 there, and
    accelerate's device is the current CUDA device. Under a distributed launch each rank's
    device is its local rank's, as the launcher says."""
    index = torch.device(device).index if device.startswith("cuda") else None
    if index is None or args.world_size > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1:
        return
    if index >= torch.cuda.device_count():
        raise PrimekdError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                           "visible CUDA device(s)")
    args.device  # noqa: B018  transformers sets its device up (and cuda:0 current) first
    torch.cuda.set_device(index)
    args.__dict__["_setup_devices"] = torch.device("cuda", index)  # the cached property


def warmup_arguments(ratio: float, fields: set[str] | None = None) -> dict[str, float]:
    """transformers 4 takes the warm-up fraction as `warmup_ratio` (its `warmup_steps` is a
    count: 0.03 would mean no warm-up); transformers 5 dropped `warmup_ratio` and reads a
    `warmup_steps` below 1 as the fraction."""
    fields = fields if fields is not None else {f.name for f in
                                                dataclasses.fields(TrainingArguments)}
    return {"warmup_ratio": ratio} if "warmup_ratio" in fields else {"warmup_steps": ratio}


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


# ---------------------------------------------------------------- the run


def distill_off_policy(config: DistillConfig, callbacks: list[TrainerCallback] | None = None,
                       progress: bool = True) -> DistillResult:
    """Train a student adapter (or full model) from a teacher store or the references."""
    check_config(config)
    out = Path(config.out)
    diskspace.expect(_planned_need(config))  # before a file is written
    with claimed(out, config.force):
        return _distill(config, out, callbacks, progress)


def _planned_need(config: DistillConfig) -> diskspace.Need:
    """The output estimate from the model's architecture alone (LoRA weights are float32)."""
    source = resolve(config.student)
    width = 4
    if config.full_finetune:
        width = _torch_dtype(config, config.device or default_device()).itemsize
    return output_need(config, planned_trainable(config, source.path), width, None,
                       source.path)


def claimed(out: Path, force: bool) -> Any:
    """The output directory checked, locked and marked (by the first process only: under
    `accelerate launch` every rank writes into the same --out)."""
    # before the Trainer exists (no is_world_process_zero yet): the launcher's rank
    if int(os.environ.get("RANK", "0")) != 0:
        return nullcontext(out)
    return outdir.claimed(out, "distill", force)


def _distill(config: DistillConfig, out: Path, callbacks: list[TrainerCallback] | None,
             progress: bool) -> DistillResult:
    out.mkdir(parents=True, exist_ok=True)
    check_out(config, out, CHECKPOINTS)
    resume_from = _last_checkpoint(out) if config.resume else None
    started = time.perf_counter()
    device = config.device or default_device()
    mixed_precision(config, device)  # refuse float16 without CUDA before loading anything
    source = resolve(config.student)
    tokenizer = load_tokenizer(source, padding_side="right")
    data = build_datasets(config, tokenizer)
    check_vocabulary(data.info, vocabulary_rows(source), config.student)
    if not config.full_finetune:
        _check_target_modules(config, source)
    # TrainingArguments first: under ZeRO-3 it registers the config from_pretrained reads to
    # partition the weights while loading (zero.Init) instead of loading all of them per rank.
    args = training_arguments(config, out, device, progress, bool(data.val))
    if args.process_index == 0:
        write_config(config, out)
    model = build_student(config, device)
    counts = trainable_parameters(model)
    width = next((p.element_size() for p in model.parameters() if p.requires_grad), 4)
    diskspace.expect(output_need(config, counts[0], width, len(data.train), source.path,
                                 args.world_size))
    trainer = kd_trainer(config, model, args, tokenizer, out, data.train, data.val,
                         [*_tensorboard(out), *(callbacks or [])], progress,
                         cross_tokenizer="cross_tokenizer" in data.info)
    if data.val and resume_from is None:
        trainer.add_callback(_ValidateAtStart(trainer))
    output = trainer.train(resume_from_checkpoint=resume_from)
    val_before = _val_before(trainer.state.log_history) if data.val else None
    val_after = _val_after(trainer) if data.val else None
    save_final_model(trainer, out, config.student, source.kind)
    wall = time.perf_counter() - started
    summary = run_summary(config, trainer, counts, device, white_box=data.info.get("white_box"),
                          val_loss=(val_before, val_after),
                          train_time=output.metrics.get("train_runtime") or wall,
                          untimed_tokens=trainer.resumed_totals[1], wall=wall, data=data.info)
    if trainer.is_world_process_zero():
        write_json(out / SUMMARY_FILE, summary)
    return DistillResult(out, summary, list(trainer.state.log_history))


def kd_trainer(config: DistillConfig, model: Any, args: TrainingArguments, tokenizer: Any,
               out: Path, train: list[Item], val: list[Item] | None = None,
               callbacks: list[TrainerCallback] | None = None, progress: bool = True,
               cross_tokenizer: bool = False) -> KDTrainer:
    """A `KDTrainer` with primekd's callbacks: the train log in `out`, and the rich progress
    bar (or none) instead of Trainer's tqdm bar and printed log dicts."""
    trainer = KDTrainer(model=model, args=args, train_dataset=train, eval_dataset=val or None,
                        data_collator=KDCollator(tokenizer.pad_token_id),
                        processing_class=tokenizer,
                        callbacks=[TrainLogWriter(out), *(callbacks or [])],
                        kd=KDSettings.of(config, cross_tokenizer))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_RichProgress())
    return trainer


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)})


def _check_target_modules(config: DistillConfig, source: Any) -> None:
    """Refuse LoRA targets the student does not have before its weights load, from the
    architecture built on the meta device (no memory, well under a second)."""
    if config.target_modules == ["all-linear"]:
        return
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source.path))
    names = _linear_names(skeleton)
    missing = [m for m in config.target_modules if m not in names]
    if missing:
        raise PrimekdError(f"LoRA target modules {', '.join(missing)} not found in "
                           f"{config.student}; its linear layers: {', '.join(names)}; "
                           "pass them with --target-modules")


def save_final_model(trainer: KDTrainer, out: Path, reference: str, kind: str) -> None:
    """The adapter (or full model) and tokenizer in `out`, made portable. Under FSDP the
    weights are gathered into one full state dict first: accelerate's FSDP2 default, a
    sharded state dict, makes `save_model` write no adapter_config.json and no loadable
    weights."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    staging = out / FINAL_STAGING  # whole files only reach `out`: see publish_final
    try:
        trainer.save_model(str(staging))
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            make_portable(staging, reference, kind)
            publish_final(staging, out)
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)


FINAL_STAGING = ".adapter_final.tmp"  # hidden; outdir counts it as distill's (adapter_*)
_LAST = ("adapter_config.json", "config.json")  # their presence says the weights are whole


def publish_final(staging: Path, out: Path) -> None:
    """Move the saved files from `staging` into `out` (renames on one filesystem), the
    configs last: `adapter_is_saved` sees a model only once its weights are all there, and
    a full disk mid-save leaves `out` as it was."""
    files = sorted(staging.iterdir(), key=lambda p: (p.name in _LAST, p.name))
    for path in files:
        target = out / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(path, target)


def adapter_is_saved(out: str | Path) -> bool:
    """Whether `out` holds a loadable final adapter or full model (config and weights)."""
    out = Path(out)
    weights = [*out.glob("*.safetensors"), *out.glob("*.bin")]
    configs = [out / "adapter_config.json", out / "config.json"]
    return any(c.exists() for c in configs) and any(
        w.name != "training_args.bin" for w in weights)


def make_portable(out: Path, reference: str, kind: str) -> None:
    """Record the base model as the user named it (the bundled GGUF as the hub id it came
    from), not the machine-local conversion cache, and give the weights the mode of their
    siblings (safetensors writes them 0600)."""
    adapter_config = out / "adapter_config.json"
    if adapter_config.exists():
        values = json.loads(adapter_config.read_text(encoding="utf-8"))
        values["base_model_name_or_path"] = BUNDLED_HUB_ID if kind == "bundled" else reference
        write_json(adapter_config, values)
    reference_file = adapter_config if adapter_config.exists() else out / "config.json"
    if reference_file.exists():
        mode = reference_file.stat().st_mode & 0o777
        for weights in out.glob("*.safetensors"):
            weights.chmod(mode)


def _resumed_totals(resume_from: str | bool | None) -> tuple[float, int]:
    if not isinstance(resume_from, str) or not (Path(resume_from) / RUN_TOTALS).exists():
        return 0.0, 0
    totals = json.loads((Path(resume_from) / RUN_TOTALS).read_text(encoding="utf-8"))
    return float(totals["loss_sum"]), int(totals["tokens"])


def check_out(config: DistillConfig, out: Path, marker: str) -> None:
    """Refuse a second run in `out` (one holding `marker` or a summary) without --resume,
    and a --resume whose options differ from the saved config (run-only fields aside): it
    would mix two runs in one directory."""
    if not config.resume:
        if (out / marker).exists() or (out / SUMMARY_FILE).exists():
            raise PrimekdError(f"{out} already holds a distill run: pass --resume to continue "
                               "it, or choose a new --out")
        return  # a train log left by a run killed before its first checkpoint is rewritten
    saved = out / CONFIG_FILE
    if not saved.exists():
        return
    before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    changed = sorted(k for k, v in config.to_dict().items()
                     if k not in options.run_only(DistillConfig) and before.get(k, v) != v)
    if changed:
        raise PrimekdError(f"--resume with changed options ({', '.join(changed)}) "
                           f"would mix two runs in {out}; use the saved "
                           f"{CONFIG_FILE} or a new --out")


def _last_checkpoint(out: Path) -> str | None:
    """The newest whole checkpoint: one a kill or a full disk cut short lacks RUN_TOTALS."""
    checkpoints = out / CHECKPOINTS
    if not checkpoints.is_dir():
        return None
    whole = [p for p in checkpoints.glob("checkpoint-*") if (p / RUN_TOTALS).is_file()
             and p.name.removeprefix("checkpoint-").isdigit()]
    if not whole:
        return None
    return str(max(whole, key=lambda p: int(p.name.removeprefix("checkpoint-"))))


def write_config(config: DistillConfig, out: Path) -> None:
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _tensorboard(out: Path) -> list[TrainerCallback]:
    """TensorBoard events in out/tensorboard; the callback writes on process zero only."""
    if importlib.util.find_spec("tensorboard") is None:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(out / "tensorboard")
    return [callback]


def _val_before(history: list[dict[str, Any]]) -> float | None:
    """The validation loss before training (step 0), also for a resumed run: the Trainer
    restores the log history from the checkpoint."""
    return next((h["eval_loss"] for h in history if h.get("step") == 0 and "eval_loss" in h),
                None)


def _val_after(trainer: KDTrainer) -> float:
    """The validation loss at the last step (evaluated now unless training just did)."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def run_summary(config: DistillConfig, trainer: KDTrainer, counts: tuple[int, int],
                device: str, *, white_box: bool | None, train_time: float,
                untimed_tokens: int, wall: float, data: dict[str, Any],
                val_loss: tuple[float | None, float | None] = (None, None)
                ) -> dict[str, Any]:
    """summary.json of a finished run (off- or on-policy). `untimed_tokens`: the tokens
    trained on outside `train_time` (before a --resume), left out of tokens/s."""
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    trainable, total = counts
    loss_sum, tokens = trainer.run_totals()  # the whole run, across a --resume
    before, after = val_loss
    return {
        "out": str(config.out),
        "student": config.student,
        "objective": config.objective,
        "divergence": config.divergence if white_box else None,
        "adapter": not config.full_finetune,
        "final_train_loss": train_logs[-1]["loss"] if train_logs else None,
        "mean_train_loss": loss_sum / max(trainer.state.global_step, 1),
        "val_loss_before": before,
        "val_loss_after": after,
        "val_improvement": before - after if before is not None and after is not None
        else None,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens": tokens,
        "tokens_per_s": (tokens - untimed_tokens) / train_time if train_time else None,
        "train_runtime_s": train_time,
        "wall_time_s": round(wall, 3),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total if total else None,
        "device": device,
        "world_size": trainer.args.world_size,
        "data": data,
    }


def remove_checkpoints(out: str | Path) -> None:
    """Delete the resumable checkpoints of a finished run, only once the final adapter (or
    model) is safely in `out`: the checkpoints may be the only copy of the weights."""
    if not adapter_is_saved(out):
        raise PrimekdError(f"{out} holds no saved adapter or model: keeping its checkpoints "
                           "(rerun with --resume to finish and save)")
    shutil.rmtree(Path(out) / CHECKPOINTS, ignore_errors=True)


__all__ = ["DistillResult", "KDSettings", "KDTrainer", "TrainLogWriter", "build_student",
           "distill_off_policy", "training_arguments"]
