"""What a distill run writes, estimated before it trains: the adapter (its trainable
parameters x bytes each), the tokenizer files saved beside it, and the resumable checkpoints
(adapter, AdamW's two float32 moments per parameter, tokenizer) that Trainer keeps (two, and a
third while it writes the next)."""

from __future__ import annotations

import math
from pathlib import Path

from primekd.core.diskspace import Need
from primekd.distill.config import DistillConfig

TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*")
CHECKPOINT_EXTRA = 64 << 10  # trainer state, scheduler, RNG states, training args
KEPT_CHECKPOINTS = 3  # save_total_limit=2, plus the one being written


def tokenizer_bytes(model_dir: str | Path) -> int:
    directory = Path(model_dir)
    if not directory.is_dir():
        return 0
    return sum(p.stat().st_size for pattern in TOKENIZER_FILES for p in directory.glob(pattern)
               if p.is_file())


def planned_trainable(config: DistillConfig, model_dir: str | Path) -> int:
    """The parameters a run will train, counted on the model built on the meta device (no
    memory, no weights read): LoRA's r x (in + out) per targeted linear layer, or all."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    if config.full_finetune:
        return sum(p.numel() for p in model.parameters())
    targets = set(config.target_modules)
    every = targets == {"all-linear"}
    return sum(config.lora_r * (m.in_features + m.out_features)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and (name.rsplit(".", 1)[-1] in targets
                    or (every and name.rsplit(".", 1)[-1] != "lm_head")))


def output_need(config: DistillConfig, trainable: int, bytes_per_param: int,
                sequences: int | None, model_dir: str | Path, world_size: int = 1) -> Need:
    """The adapter (or full model) and its checkpoints; the floor is the final output alone.
    `sequences` None (not yet read): checkpoints counted from --max-steps only."""
    weights = trainable * bytes_per_param
    final = weights + tokenizer_bytes(model_dir) + CHECKPOINT_EXTRA
    moments = 2 * trainable * 4 if config.optimizer == "adamw" else trainable * 4
    per_step = config.batch_size * config.grad_accum * world_size
    steps = config.max_steps or (0 if sequences is None else
                                 math.ceil(math.ceil(sequences / per_step)
                                           * (config.epochs or 1)))
    checkpoints = min(steps // config.save_steps, KEPT_CHECKPOINTS)
    what = "the model" if config.full_finetune else "the adapter"
    return Need(final + checkpoints * (final + moments), final,
                f"distill ({what}: {trainable:,} parameters x {bytes_per_param} bytes, "
                f"{checkpoints} checkpoint(s))")
