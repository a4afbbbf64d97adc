"""The GPU-path defects of issue 25, shown on CPU where a CPU can show them: one GPU per
process without a distributed launch, memory released before a vLLM server starts, the
teacher's server kept out of eval stages, per-role engine options, and the on-policy
refusals (another tokenizer, out-of-range teacher rows, a distributed launch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from primekd.core.errors import PrimekdError
from primekd.distill.config import DistillConfig


def _sft_config(model: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(model), out=str(out), objective="sft", data="train", limit=4,
                batch_size=2, max_steps=1, logging_steps=1, lr=1e-3, warmup_ratio=0.0,
                device="cpu")
    base.update(kw)
    return DistillConfig(**base)


# ---------------------------------------------------------------- A: one GPU per process


def test_several_visible_gpus_without_a_launcher_train_on_one(tiny_model_dir, tmp_path):
    """transformers sets n_gpu = device_count() without a distributed launch and wraps the
    model in nn.DataParallel (breaking the head tap, multiplying the batch): simulated here
    by the n_gpu it would set on a 4-GPU machine."""
    from primekd.distill.trainer import KDSettings, KDTrainer, build_student, training_arguments

    config = _sft_config(tiny_model_dir, tmp_path / "o")
    args = training_arguments(config, tmp_path / "o", "cpu", False, False)
    args._n_gpu = 4  # what TrainingArguments sets with 4 visible GPUs and no launcher
    trainer = KDTrainer(model=build_student(config, "cpu"), args=args, kd=KDSettings())
    assert trainer.args.n_gpu == 1
    assert trainer.args.train_batch_size == config.batch_size
    wrapped = trainer._wrap_model(trainer.model, training=True)
    assert not isinstance(wrapped, torch.nn.DataParallel)


def test_device_index_beyond_the_visible_gpus_is_one_line(tmp_path):
    from primekd.distill.trainer import pin_device, training_arguments

    config = DistillConfig(out=str(tmp_path), device="cpu")
    args = training_arguments(config, tmp_path, "cpu", False, False)
    if torch.cuda.device_count() > 5:
        pytest.skip("a machine with more than 5 GPUs")
    with pytest.raises(PrimekdError, match="--device cuda:5: this machine has"):
        pin_device(args, "cuda:5")
