"""Shared fixtures: a tiny random model for unit tests, the bundled model for integration."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# No accidental hub traffic from any test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Subprocess tests run the `primekd` and `accelerate` scripts of this interpreter's
# environment, also when pytest is started as `.venv/bin/python -m pytest` (as CI does).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


_HEAVY = ("slow", "vllm", "integration")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files with the most slow tests first, the rest in their order: `make test` hands
    whole files to two workers (pytest-xdist, --dist loadfile) in this order, so a long file
    started last would leave one worker idle at the end."""
    weight: dict[str, int] = {}
    for item in items:
        heavy = any(item.get_closest_marker(m) for m in _HEAVY)
        weight[item.fspath.strpath] = weight.get(item.fspath.strpath, 0) + heavy
    items.sort(key=lambda item: -weight[item.fspath.strpath])  # stable: within a file as is


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
    from primekd.core.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def bundled() -> tuple:
    """The bundled SmolLM2-135M-Instruct (model, tokenizer), loaded once per session."""
    from primekd.core.models import BUNDLED_ALIAS, load

    return load(BUNDLED_ALIAS)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def vllm_scratch(tmp_path_factory: pytest.TempPathFactory):
    """The session's vLLM servers (in this process and in the CLIs it runs) put their
    `primekd-vllm-*` scratch directories in a private temp folder; at the end none may be
    left (a server's directory goes when it is stopped, unless it failed, and tests of
    failures remove what they provoked). Private, so other jobs' servers do not count."""
    tmp_path_factory.getbasetemp()  # pytest's own temp root stays where it was
    private = Path(tempfile.mkdtemp(prefix="primekd-test-tmp-"))
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(private), str(private)
    yield private
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = saved[1]
    left = sorted(p.name for p in private.glob("primekd-vllm-*"))
    shutil.rmtree(private, ignore_errors=True)
    assert not left, f"vLLM server scratch directories left behind: {left}"


@pytest.fixture(scope="session")
def vllm_env() -> str:
    """The Python of the vLLM environment (.venv-vllm, `make vllm`). Without it the tests that
    need it skip, except under CI=true, where they fail."""
    from primekd.core.errors import PrimekdError
    from primekd.engines.vllm import vllm_python

    try:
        return str(vllm_python())
    except PrimekdError as e:
        if _ci():
            pytest.fail(f"CI=true and no vLLM environment: {e}")
        pytest.skip(f"no vLLM environment ({e})")


@pytest.fixture(scope="session")
def vllm_url(vllm_env: str, vllm_scratch: Path) -> str:
    """ONE real vLLM server on loopback for the session, serving the bundled model in float32
    (as the hf engine runs it on CPU, so the two engines must agree closely)."""
    from primekd.core.models import BUNDLED_ALIAS, resolve
    from primekd.engines.vllm import VLLMServer
    from primekd.engines.vllm_server import group_members

    server = VLLMServer(resolve(BUNDLED_ALIAS).path, {"dtype": "float32"}).start()
    group = server.process.pid
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()
    # stop() returns once the API server, its EngineCore and workers have all exited
    assert group_members(group) == [], "processes of the stopped vLLM server remain"
