"""Recording what every decoder layer sees during an fp forward pass (pure torch, no I/O).

The pipeline calls this once per calibration sample and streams the results to the activation
store; because scaling searches are exact on fp inputs, every layer can then be searched alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..models.layer_io import clean_layer_kwargs


@torch.no_grad()
def record_layer_inputs(
    model: nn.Module,
    layers: Sequence[nn.Module],
    inputs: dict[str, torch.Tensor],
    on_layer_input: Callable[[int, torch.Tensor], None],
) -> dict[str, Any]:
    """Run ``model(**inputs)`` (batch 1) and call ``on_layer_input(i, hidden[T, C])`` per layer.

    Returns the cleaned kwargs decoder layer 0 received; every layer gets the same ones.
    """
    seen: dict[str, Any] = {}
    handles = []

    def make_hook(i: int):
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                seen.update(clean_layer_kwargs({k: v for k, v in kwargs.items() if k != "hidden_states"}))
            on_layer_input(i, hidden[0].detach())

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen
