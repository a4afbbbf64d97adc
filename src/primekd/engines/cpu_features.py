"""What the CPU computes natively, for engine defaults that depend on it.

vLLM's CPU build runs bfloat16 at full speed only where the CPU has bf16 instructions
(x86: AVX512-BF16 or AMX-BF16; Arm: the `bf16` feature). Elsewhere (an AVX2-only AMD EPYC,
for one) every bf16 matmul is emulated: slower than float32 (docs/engines.md has the
figures) and, through its rounding, answers that drift from the hf engine's float32 ones.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo (x86 `flags`, Arm `Features`); empty when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


def cpu_dtype(flags: frozenset[str] | None = None) -> str:
    """The vLLM CPU server's default dtype: bfloat16 where the CPU computes it natively."""
    return "bfloat16" if native_bf16(flags) else "float32"
