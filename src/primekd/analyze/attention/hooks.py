"""Reduce attention to head statistics inside per-layer forward hooks.

With eager attention, each attention module of a transformers model returns
`(attn_output, attn_weights)`, the weights shaped (batch, heads, T, T), one map per query
head (under grouped-query attention the key/value heads are repeated first). A forward hook
on every attention module hands those weights to `AttentionCollector.reduce_layer`, which
turns them into a few numbers per head at once; the decoder layer then drops the map. The
only T x T maps alive at any time are the current layer's and the previous layer's (for the
cross-layer similarity).

To compare models on identical tokens, the batch holds the same prompt once per model
(`ModelBank` runs the base model and its LoRA adapters as one mixed-adapter batch), so a
layer's hook sees every model's maps for that layer together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from primekd.analyze.attention.metrics import (
    JS_METRIC,
    METRICS,
    cross_layer_similarity,
    head_metrics,
    pairwise_js,
)
from primekd.core.errors import PrimekdError

_ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")

LayerCallback = Callable[[int, torch.Tensor], None]


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The model's self-attention modules, one per decoder layer, in layer order."""
    found = [
        module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in _ATTENTION_NAMES
        and type(module).__name__.endswith("Attention")
    ]
    if not found:
        raise PrimekdError(
            f"found no self-attention modules in {type(model).__name__}: attention analysis "
            "supports decoder models whose layers have a `self_attn` module (Llama, Qwen, ...)"
        )
    if all(hasattr(module, "layer_idx") for module in found):
        found.sort(key=lambda module: module.layer_idx)
    return found


def no_weights_error() -> PrimekdError:
    return PrimekdError(
        "the model returned no attention weights: attention analysis needs eager attention "
        "(SDPA and flash attention never materialise the weights). Load the model with "
        "attn_implementation='eager'; architectures without an eager path cannot be analysed"
    )


@contextmanager
def attention_hooks(model: Any, on_layer: LayerCallback) -> Iterator[int]:
    """Call `on_layer(layer, weights)` from every attention module; yields the layer count."""
    modules = attention_modules(model)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
                raise no_weights_error()
            on_layer(layer, weights.detach())

        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        yield len(modules)
    finally:
        for handle in handles:
            handle.remove()


class RunningStats:
    """Sums and sums of squares over prompts, per cell of a fixed-shape array."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.total = np.zeros(shape)
        self.squares = np.zeros(shape)
        self.count = np.zeros(shape)

    def add(self, index: Any, values: torch.Tensor) -> None:
        array = values.double().cpu().numpy()
        self.total[index] += array
        self.squares[index] += array**2
        self.count[index] += 1

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / self.count, np.nan)

    def sd(self) -> np.ndarray:
        """Sample standard deviation over prompts (NaN with fewer than two)."""
        n = self.count
        with np.errstate(invalid="ignore", divide="ignore"):
            variance = (self.squares - self.total**2 / n) / (n - 1)
            return np.where(n > 1, np.sqrt(np.clip(variance, 0, None)), np.nan)


class AttentionCollector:
    """Accumulates per-prompt head statistics for M models, L layers, H heads.

    Call `begin_prompt()`, then `reduce_layer(layer, weights)` for layers 0..L-1 in order with
    weights (M, H, T, T) for one prompt, then `end_prompt()`.
    """

    def __init__(
        self, n_models: int, n_layers: int, n_heads: int, threshold: float, top_k: int
    ) -> None:
        self.shape = (n_models, n_layers, n_heads)
        self.threshold = threshold
        self.top_k = top_k
        self.stats = {metric: RunningStats(self.shape) for metric in METRICS}
        self.js = RunningStats((n_layers, n_heads))
        self.prompts = 0
        self._previous: tuple[int, torch.Tensor] | None = None

    def begin_prompt(self) -> None:
        self._previous = None

    def reduce_layer(self, layer: int, weights: torch.Tensor) -> None:
        models, _, heads = self.shape
        if weights.shape[0] != models or weights.shape[1] != heads:
            raise PrimekdError(
                f"layer {layer} returned attention of shape {tuple(weights.shape)}; expected "
                f"{models} models x {heads} heads"
            )
        weights = weights.float()
        for metric, values in head_metrics(weights, self.threshold, self.top_k).items():
            self.stats[metric].add((slice(None), layer), values)
        if self._previous is not None and self._previous[0] == layer - 1:
            similarity = cross_layer_similarity(self._previous[1], weights)
            self.stats["cross_layer"].add((slice(None), layer - 1), similarity)
        if models > 1:
            self.js.add(layer, pairwise_js(weights))
        self._previous = (layer, weights)

    def end_prompt(self) -> None:
        self._previous = None
        self.prompts += 1

    def means(self) -> dict[str, np.ndarray]:
        """metric -> (M, L, H) means over prompts; JS as (L, H)."""
        out = {metric: stats.mean() for metric, stats in self.stats.items()}
        out[JS_METRIC] = self.js.mean()
        return out


class ModelBank:
    """A base model plus named LoRA adapters, run together on one prompt.

    With LoRA adapters, one forward pass on a batch holding the prompt once per model uses
    PEFT's mixed-adapter batches (row m runs with adapter m; `__base__` disables them), so
    each layer's hook receives all models' maps at once. Adapters that PEFT cannot mix
    (DoRA, non-LoRA) run one after another instead; their maps for the current prompt are
    then held until every model has run (float16, one prompt at a time).
    """

    BASE = "__base__"

    def __init__(self, model: Any, adapter_keys: list[str]) -> None:
        self.model = model
        self.keys = [self.BASE, *adapter_keys]
        self.mixed = not adapter_keys or _mixable(model, adapter_keys)

    @property
    def size(self) -> int:
        return len(self.keys)

    def run(self, input_ids: torch.Tensor, on_layer: LayerCallback) -> None:
        """Forward the prompt through every model, calling on_layer with (M, H, T, T)."""
        with torch.no_grad():
            if self.mixed:
                self._run_mixed(input_ids, on_layer)
            else:
                self._run_sequential(input_ids, on_layer)

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any) -> None:
        self.model(input_ids=input_ids, use_cache=False, **kwargs)

    def _run_mixed(self, input_ids: torch.Tensor, on_layer: LayerCallback) -> None:
        batch = input_ids.repeat(self.size, 1)
        with attention_hooks(self.model, on_layer):
            if self.size == 1:
                self._forward(batch)
            else:
                self._forward(batch, adapter_names=list(self.keys))

    def _run_sequential(self, input_ids: torch.Tensor, on_layer: LayerCallback) -> None:
        held: dict[int, list[torch.Tensor]] = {}

        def hold(layer: int, weights: torch.Tensor) -> None:
            held.setdefault(layer, []).append(weights.to("cpu", torch.float16))

        with attention_hooks(self.model, hold):
            for key in self.keys:
                if key == self.BASE:
                    with self.model.disable_adapter():
                        self._forward(input_ids)
                else:
                    self.model.set_adapter(key)
                    self._forward(input_ids)
        device = input_ids.device
        for layer in sorted(held):
            on_layer(layer, torch.cat(held.pop(layer)).to(device, torch.float32))


def _mixable(model: Any, adapter_keys: list[str]) -> bool:
    configs = getattr(model, "peft_config", {})
    for key in adapter_keys:
        config = configs.get(key)
        peft_type = str(getattr(config, "peft_type", ""))
        if not peft_type.endswith("LORA") or getattr(config, "use_dora", False):
            return False
    return True
