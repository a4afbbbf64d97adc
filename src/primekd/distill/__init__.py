"""Distillation: options (`config`), training data (`data`), the KD loss (`kd_loss`), the LoRA
trainer (`trainer`) and on-policy distillation (`onpolicy`).

`primekd.distill.distill(DistillConfig(...))` runs either; torch loads on the first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from primekd.core import diskspace
from primekd.distill.config import DistillConfig

if TYPE_CHECKING:
    from primekd.distill.trainer import DistillResult

__all__ = ["DistillConfig", "distill"]


def distill(config: DistillConfig, callbacks: list[Any] | None = None,
            progress: bool = True) -> DistillResult:
    """Train a student adapter (or full model) as `config` says; write everything to `out`.
    A full disk is one line (core.diskspace) that says how to go on."""
    rerun = diskspace.RERUN if config.resume else \
        "rerun it with --resume: it goes on from its last whole checkpoint"
    with diskspace.guard(config.out or ".", rerun=rerun):
        if config.on_policy:
            from primekd.distill.onpolicy import distill_on_policy

            return distill_on_policy(config, progress)
        from primekd.distill.trainer import distill_off_policy

        return distill_off_policy(config, callbacks, progress)
