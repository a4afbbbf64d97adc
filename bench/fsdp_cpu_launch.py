"""Run `primekd` under `accelerate launch --use_fsdp` on CPU processes (gloo).

accelerate turns FSDP on only for accelerator devices (a MULTI_CPU run silently becomes plain
DDP); torch's FSDP itself runs on CPU with gloo, so this launcher switches it on after
accelerate has set up the process group. For tests and bench/gpu_check.sh --device cpu;
on GPUs it changes nothing (accelerate enables FSDP itself).
"""
import os
import sys

from accelerate import state as accel_state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accel_state.AcceleratorState.__init__


def _init_with_cpu_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and self.distributed_type == DistributedType.MULTI_CPU):
        plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


accel_state.AcceleratorState.__init__ = _init_with_cpu_fsdp

from primekd.cli import main  # noqa: E402

sys.exit(main())
