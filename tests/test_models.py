from __future__ import annotations

import pytest
import torch

from primekd.errors import PrimekdError
from primekd.models import BUNDLED_ALIAS, load, resolve, tokenizer_fingerprint


def test_unknown_alias_is_a_clear_error() -> None:
    with pytest.raises(PrimekdError, match="unknown model"):
        resolve("no-such-model")


def test_missing_paths_are_clear_errors(tmp_path) -> None:
    with pytest.raises(PrimekdError, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(PrimekdError, match="does not exist"):
        resolve(str(tmp_path / "missing" / "dir"))
    with pytest.raises(PrimekdError, match="config.json"):
        resolve(str(tmp_path))


def test_hub_id_fails_clearly_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from primekd.models import load_tokenizer

    with pytest.raises(PrimekdError, match="hub"):
        load_tokenizer("nobody-here/definitely-not-a-model")


def test_local_directory_loads_with_left_padding(tiny_model_dir) -> None:
    model, tokenizer = load(str(tiny_model_dir))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    assert not model.training


def test_fingerprint_is_vocabulary_hash(tiny_model_dir) -> None:
    from primekd.testing import tiny_tokenizer

    _, tokenizer = load(str(tiny_model_dir))
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(tiny_tokenizer(300))


@pytest.mark.integration
def test_bundled_alias_loads_and_matches_gguf_logits(bundled) -> None:
    model, tokenizer = bundled
    source = resolve(BUNDLED_ALIAS)
    assert source.kind == "bundled"
    assert model.config.vocab_size == len(tokenizer) == 49152
    ids = tokenizer("Natalia sold 48 clips", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
