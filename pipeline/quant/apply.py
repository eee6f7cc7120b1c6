"""Putting search results into a live fp model as fake-quant weights: the reference path."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .quantizer import QuantizedWeight, fake_quantize_activations


@torch.no_grad()
def apply_fake_quant(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    replaced: Mapping[str, torch.Tensor],
    act_bits: int = 16,
) -> nn.Module:
    """Replace fp tensors (folded norms, ...) first, then every quantized Linear's weight by
    its dequantized value. Names are full module names (Linear names, parameter names).

    With ``act_bits < 16`` each quantized Linear also fake-quantizes its input per token
    (dynamic symmetric), as a W4A8 checkpoint runs.
    """
    params = dict(model.named_parameters())
    for name, value in replaced.items():
        p = params[name]
        p.data.copy_(value.to(p.dtype))
    for name, qw in quantized.items():
        lin = model.get_submodule(name)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype).to(lin.weight.device))
        if act_bits < 16:
            lin.register_forward_pre_hook(act_quant_pre_hook(act_bits))
    return model


def act_quant_pre_hook(bits: int):
    """A forward pre-hook making a Linear fake-quantize its input per token (dynamic, symmetric)."""

    def hook(_mod: nn.Module, args: tuple) -> tuple:
        return (fake_quantize_activations(args[0], bits), *args[1:])

    return hook
