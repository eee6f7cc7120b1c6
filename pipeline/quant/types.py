"""The contract between the pipeline and every search method.

A *block* is one or more consecutive decoder layers (one for RTN/AWQ/MBQ, a run of layers for
Q-VLM). A method is a pure function::

    search(layers, layer_ids, calib, settings) -> BlockResult

Names inside a result are ``"<layer index>.<path relative to the decoder layer>"``, for example
``"3.self_attn.q_proj"`` (a quantized Linear) or ``"3.input_layernorm.weight"`` (a replaced fp
tensor). The pipeline prefixes them with the adapter's ``layers_path`` to get checkpoint names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .quantizer import QuantizedWeight, QuantScheme


@dataclass(frozen=True)
class LinearGroup:
    """Linears that share one input, and the op that input comes from (scales fold into it)."""

    name: str  # "qkv" | "o" | "gate_up" | "down"
    linears: tuple[str, ...]  # paths relative to a decoder layer, e.g. ("self_attn.q_proj", ...)
    prev_op: str  # relative path of the norm or Linear whose output feeds them
    kind: str  # "attn" | "mlp": which MBQ sensitivity ratio weights this group's loss


@dataclass
class Sample:
    """One calibration sample as a block sees it."""

    hidden: torch.Tensor  # [T, C] fp input hidden states of the block's first layer
    layer_kwargs: dict[str, Any]  # the exact kwargs a decoder layer receives (position_embeddings, ...)
    vision_mask: torch.Tensor  # [T] bool: vision-token positions (after image-token expansion)
    answer_mask: torch.Tensor  # [T] bool: positions holding answer tokens (labels != -100)


@dataclass
class BlockCalib:
    """Calibration inputs for one block. ``samples`` may be a lazy sequence streaming from the store."""

    samples: Sequence[Sample]
    # MBQ: {layer index: {"r_attn": float, "r_mlp": float}}; None when the method needs none.
    sensitivity: dict[int, dict[str, float]] | None = None


@dataclass
class SearchSettings:
    scheme: QuantScheme
    groups: tuple[LinearGroup, ...]  # from the model adapter, relative to one decoder layer
    scale_dtype: torch.dtype = torch.float16
    abits: int = 16  # 8 for W4A8: activations per-token int8
    options: dict[str, Any] = field(default_factory=dict)  # method options from the recipe
    device: torch.device | str = "cpu"


@dataclass
class BlockResult:
    quantized: dict[str, QuantizedWeight]
    replaced: dict[str, torch.Tensor]  # fp tensors changed by folding (norm weights, v_proj, ...)
    metrics: dict[str, Any]  # JSON-able: per-group alpha, losses, clip ratios, ...


SearchFn = Callable[[list[nn.Module], list[int], BlockCalib, SearchSettings], BlockResult]


def layer_forward(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one decoder layer on one sample ``[T, C]`` and return ``[T, C]``.

    Decoder layers in transformers 5 return a tensor (older ones a tuple); accept both.
    """
    out = layer(hidden.unsqueeze(0), **layer_kwargs)
    if isinstance(out, tuple):
        out = out[0]
    return out.squeeze(0)


def quantizable_linears(layer: nn.Module, groups: Sequence[LinearGroup]) -> dict[str, nn.Linear]:
    """The Linears of one decoder layer named by its groups, in group order."""
    out: dict[str, nn.Linear] = {}
    for g in groups:
        for name in g.linears:
            out[name] = layer.get_submodule(name)  # type: ignore[assignment]
    return out
