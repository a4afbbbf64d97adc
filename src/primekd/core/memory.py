"""Giving in-process GPU memory back before something else needs it (a vLLM server, the next
tune trial): vLLM refuses to start while free memory is below gpu_memory_utilization x total,
and PyTorch keeps freed blocks reserved in its cache until told otherwise."""

from __future__ import annotations

import gc
import sys


def release_memory() -> None:
    """Collect reference cycles (a Trainer and its callbacks keep a model and its optimizer
    state alive after the last reference goes), then return PyTorch's cached CUDA blocks."""
    gc.collect()
    torch = sys.modules.get("torch")  # nothing to give back where torch never loaded
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
