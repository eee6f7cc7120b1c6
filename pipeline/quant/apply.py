"""Putting search results into a live fp model as fake-quant weights: the reference path."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .quantizer import QuantizedWeight


@torch.no_grad()
def apply_fake_quant(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], replaced: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Replace fp tensors (folded norms, ...) first, then every quantized Linear's weight by
    its dequantized value. Names are full module names (Linear names, parameter names)."""
    params = dict(model.named_parameters())
    for name, value in replaced.items():
        p = params[name]
        p.data.copy_(value.to(p.dtype))
    for name, qw in quantized.items():
        lin = model.get_submodule(name)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype).to(lin.weight.device))
    return model
