"""Running a VLM one decoder layer at a time: any size of model in one layer's worth of memory.

The *head* (vision tower, projector, embeddings, final norm, lm_head) is resident; decoder
layers are built one at a time from a ``WeightSource``. The same runner serves the capture pass,
the held-out reference (fp and fake-quant), and checkpoint validation of models far larger than
one device, because all of them only differ in where layer weights come from: the fp source, the
fp source overlaid with search results (:class:`OverlaySource`), or a packed checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..models.base import VLMAdapter
from ..models.weights import WeightSource
from ..models.layer_io import clean_layer_kwargs
from ..quant.quantizer import QuantizedWeight
from ..quant.types import layer_forward


class _StopForward(Exception):
    """Raised at decoder layer 0 to end the forward once its input is known."""


def build_head(source: WeightSource, adapter: VLMAdapter, dtype: torch.dtype | None,
               device: torch.device | str) -> nn.Module:
    """The whole model with every tensor loaded except the decoder layers (left on meta)."""
    from ..models.loading import build_model

    return build_model(source, adapter, dtype=dtype, device=device, skip_layers=True)


@torch.no_grad()
def embed(head: nn.Module, adapter: VLMAdapter, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """(hidden states entering decoder layer 0 ``[T, C]``, the kwargs every layer receives)."""
    layer0 = head.get_submodule(adapter.layers_path)[0]
    seen: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"])[0].detach()
        seen["kwargs"] = clean_layer_kwargs({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        head(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError("the model never reached decoder layer 0")
    return seen["hidden"], seen["kwargs"]


def final_logits(head: nn.Module, adapter: VLMAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head on the last layer's output ``[T, C]`` -> ``[T, V]``."""
    norm = head.get_submodule(adapter.final_norm_path)
    lm_head = head.get_submodule(adapter.lm_head_path)
    return lm_head(norm(hidden.unsqueeze(0)))[0]


def to_device(inputs: Mapping[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


@torch.no_grad()
def streamed_logits(
    source: WeightSource,
    adapter: VLMAdapter,
    samples: Sequence[Mapping[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str,
    layer_hook: Callable[[int, nn.Module], None] | None = None,
) -> list[torch.Tensor]:
    """Logits ``[T, V]`` (float32, CPU) of every sample, decoder layers loaded one at a time."""
    from ..models.loading import build_layers

    head = build_head(source, adapter, dtype, device)
    states = []
    for inp in samples:
        h, kw = embed(head, adapter, to_device(inp, device, dtype))
        states.append([h, kw])
    n_layers = len(head.get_submodule(adapter.layers_path))
    for i in range(n_layers):
        (layer,) = build_layers(source, adapter, [i], dtype=dtype, device=device)
        if layer_hook is not None:
            layer_hook(i, layer)
        for st in states:
            st[0] = layer_forward(layer, st[0], st[1])
        del layer
    return [final_logits(head, adapter, h).float().cpu() for h, _ in states]


class OverlaySource(WeightSource):
    """A source whose quantized Linears read as their dequantized weights and whose replaced
    tensors (folded norms, ...) read as the search's values: the fake-quant model, streamed."""

    def __init__(self, base: WeightSource, quantized: Mapping[str, QuantizedWeight],
                 replaced: Mapping[str, torch.Tensor]):
        self.base = base
        self.model_dir = base.model_dir
        self.quantized = quantized  # by module name; may be lazy (PartModules): never iterated
        self.replaced = dict(replaced)

    @property
    def config_dict(self) -> dict[str, Any]:
        return self.base.config_dict

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module in self.quantized:
            # exact (q - zero) * scale; the layer builder casts to the compute dtype, as the
            # checkpoint loader does
            return self.quantized[module].dequantize(torch.float32)
        if name in self.replaced:
            return self.replaced[name].to(self.base.dtype(name))
        return self.base.get(name)


def act_quant_hook(act_bits: int) -> Callable[[int, nn.Module], None] | None:
    """A ``layer_hook`` making every Linear of a layer fake-quantize its input (W4A8)."""
    if act_bits >= 16:
        return None
    from ..quant.apply import act_quant_pre_hook

    def hook(_i: int, layer: nn.Module) -> None:
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                mod.register_forward_pre_hook(act_quant_pre_hook(act_bits))

    return hook
