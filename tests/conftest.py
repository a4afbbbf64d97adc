"""Shared fixtures: a tiny random model for unit tests, the bundled model for integration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# No accidental hub traffic from any test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Subprocess tests run the `primekd` and `accelerate` scripts of this interpreter's
# environment, also when pytest is started as `.venv/bin/python -m pytest` (as CI does).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a CPU shared with other jobs OpenMP
    threads that spin-wait for each other make generation many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from primekd.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def bundled() -> tuple:
    """The bundled SmolLM2-135M-Instruct (model, tokenizer), loaded once per session."""
    from primekd.models import BUNDLED_ALIAS, load

    return load(BUNDLED_ALIAS)
