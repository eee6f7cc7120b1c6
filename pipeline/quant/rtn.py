"""RTN: round-to-nearest of every Linear of a decoder block. The baseline every method must beat."""

from __future__ import annotations

from torch import nn

from .quantizer import quantize_weight
from .types import BlockCalib, BlockResult, SearchSettings, quantizable_linears


def search_rtn(
    layers: list[nn.Module], layer_ids: list[int], calib: BlockCalib | None, settings: SearchSettings
) -> BlockResult:
    """RTN needs no calibration data; ``calib`` is accepted for the uniform method signature."""
    quantized = {}
    for layer, idx in zip(layers, layer_ids):
        for name, lin in quantizable_linears(layer, settings.groups).items():
            quantized[f"{idx}.{name}"] = quantize_weight(lin.weight.data, settings.scheme, settings.scale_dtype)
    return BlockResult(quantized=quantized, replaced={}, metrics={"method": "rtn"})
