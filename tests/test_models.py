from __future__ import annotations

import pytest
import torch

from primekd.core.errors import PrimekdError
from primekd.core.models import BUNDLED_ALIAS, load, resolve, tokenizer_fingerprint


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
    from primekd.core.models import load_tokenizer

    with pytest.raises(PrimekdError, match="hub"):
        load_tokenizer("nobody-here/definitely-not-a-model")


def test_local_directory_loads_with_left_padding(tiny_model_dir) -> None:
    model, tokenizer = load(str(tiny_model_dir))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    assert not model.training


def test_fingerprint_is_vocabulary_hash(tiny_model_dir) -> None:
    from primekd.core.testing import tiny_tokenizer

    _, tokenizer = load(str(tiny_model_dir))
    _, reloaded = load(str(tiny_model_dir))  # another instance of the same vocabulary
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(reloaded)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(tiny_tokenizer(300))


# GGUF tensor name -> transformers parameter name (attn_q/attn_k are stored permuted).
_GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "attn_output": "self_attn.o_proj", "attn_v": "self_attn.v_proj"}


@pytest.mark.integration
def test_bundled_alias_loads_and_matches_gguf_weights(bundled) -> None:
    import gguf

    from primekd.core.models import bundled_gguf_path

    model, tokenizer = bundled
    source = resolve(BUNDLED_ALIAS)
    assert source.kind == "bundled"
    assert model.config.vocab_size == len(tokenizer) == 49152
    weights = model.state_dict()
    compared = 0
    for tensor in gguf.GGUFReader(str(bundled_gguf_path())).tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and parts[2] in _GGUF_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
        elif parts[0] in _GGUF_NAMES:
            name = f"model.{_GGUF_NAMES[parts[0]]}.weight"
        else:
            continue
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        torch.testing.assert_close(weights[name].float(), expected.float().reshape(
            weights[name].shape), rtol=0, atol=1e-6, msg=tensor.name)
        compared += 1
    assert compared == 2 + 7 * model.config.num_hidden_layers
    ids = tokenizer("Natalia sold 48 clips", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
