"""SmoothQuant (the W4A8 baseline of METHODS.md §4): migrate activation outliers into weights with
``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (alpha = 0.5), fold like AWQ, then RTN.

No search and no clip. ``max|W|`` is over the rows of all Linears of the group. Metrics report
the group loss (plain MSE over all tokens, activations quantized when abits < 16) of RTN and of
the smoothed weights, so the baseline is measured the same way as AWQ/MBQ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .awq import ScaleOptions, run_block, scale_search_layer
from .groups import GroupInputs, Weighting
from .types import BlockCalib, BlockResult, LinearGroup, SearchSettings

_FLOOR = 1e-5


def smoothquant_scales(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``max|X_c|^alpha / max|W_:,c|^(1-alpha)``; ``w`` is [out, in] (all the group's rows)."""
    xm = x_absmax.clamp(min=_FLOOR)
    wm = w.abs().amax(0).clamp(min=_FLOOR)
    return (xm.pow(alpha) / wm.pow(1 - alpha)).clamp(min=_FLOOR)


def _choose(alpha: float) -> Callable:
    def choose(group: LinearGroup, inputs: GroupInputs, w: torch.Tensor,
               loss: Callable[[torch.Tensor], float]) -> tuple[torch.Tensor, dict[str, Any]]:
        s = smoothquant_scales(inputs.absmax, w, alpha)
        return s, {"alpha": alpha, "loss_rtn": loss(torch.ones_like(s)), "loss_scaled": loss(s)}

    return choose


def search_smoothquant(
    layers: list[nn.Module], layer_ids: list[int], calib: BlockCalib, settings: SearchSettings
) -> BlockResult:
    opts = ScaleOptions.from_options(settings.options)

    def per_layer(layer: nn.Module, idx: int, samples: Any) -> tuple[dict, dict, dict]:
        return scale_search_layer(layer, samples, settings, lambda g: Weighting("mse", None),
                                  _choose(opts.alpha), clip=False)

    return run_block(layers, layer_ids, calib, settings, per_layer, "smoothquant")
