"""MBQ (METHODS.md §4): AWQ's groups, grid and folding with a modality-balanced loss.

Per candidate, with Delta = fp output - candidate output of the group's Linears (C channels)::

    loss = (sum_ans |Delta| + r * sum_vis |Delta|) / (N_ans * C + N_vis * C)

r = r_attn for the qkv and o groups, r_mlp for gate_up and down (``LinearGroup.kind``), from the
gradient pass (``sensitivity.py``): vision tokens matter r times as much as answer tokens to
the answer loss. Tokens that are neither weigh 0. ``options["loss"] == "mse"`` squares Delta.
The same weighting applies inside the clip search unless ``mbq_clip_weighting`` is off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .awq import ScaleOptions, choose_grid, run_block, scale_search_layer
from .groups import Weighting
from .types import BlockCalib, BlockResult, LinearGroup, SearchSettings


def balanced_loss(
    delta: torch.Tensor, answer_mask: torch.Tensor, vision_mask: torch.Tensor, r: float, norm: str = "mae"
) -> float:
    """The MBQ loss of one output difference ``delta`` [T, C] (the formula, written out)."""
    f = delta.abs() if norm == "mae" else delta.square()
    num = f[answer_mask].sum() + r * f[vision_mask].sum()
    den = (int(answer_mask.sum()) + int(vision_mask.sum())) * delta.shape[-1]
    return float(num / den)


def layer_ratios(sensitivity: dict | None, layer_idx: int) -> dict[str, float]:
    """``{"r_attn", "r_mlp"}`` of one layer (keys may be ints or, after JSON, strings)."""
    if not sensitivity:
        raise ValueError("mbq needs calib.sensitivity ({layer: {'r_attn', 'r_mlp'}}) from the gradient pass")
    entry = sensitivity.get(layer_idx, sensitivity.get(str(layer_idx)))
    if entry is None:
        raise ValueError(f"mbq: no sensitivity ratios for layer {layer_idx}")
    return {"r_attn": float(entry["r_attn"]), "r_mlp": float(entry["r_mlp"])}


def mbq_weighting(group: LinearGroup, ratios: dict[str, float], norm: str) -> Weighting:
    if group.kind not in ("attn", "mlp"):
        raise ValueError(f"group {group.name} has kind {group.kind!r}; MBQ needs 'attn' or 'mlp'")
    return Weighting(norm, ratios["r_attn"] if group.kind == "attn" else ratios["r_mlp"])


def search_mbq(
    layers: list[nn.Module], layer_ids: list[int], calib: BlockCalib, settings: SearchSettings
) -> BlockResult:
    """MBQ: AWQ's grid search and clip search under the modality-balanced loss."""
    opts = ScaleOptions.from_options(settings.options)
    if opts.loss not in ("mae", "mse"):
        raise ValueError(f"mbq loss must be 'mae' or 'mse', got {opts.loss!r}")

    def per_layer(layer: nn.Module, idx: int, samples: Any) -> tuple[dict, dict, dict]:
        ratios = layer_ratios(calib.sensitivity, idx)
        q, r, m = scale_search_layer(layer, samples, settings, lambda g: mbq_weighting(g, ratios, opts.loss),
                                     choose_grid(opts.grid), clip=opts.clip, clip_weighted=opts.mbq_clip_weighting)
        m["sensitivity"] = ratios
        return q, r, m

    return run_block(layers, layer_ids, calib, settings, per_layer, "mbq")
