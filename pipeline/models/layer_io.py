"""What a decoder layer receives, and how to replay it standalone.

The pipeline captures decoder layer 0's kwargs once per sample (a forward pre-hook with
``with_kwargs=True``) and replays every layer alone with ``pipeline.quant.types.layer_forward``.
That is exact (tests/models/test_layer_replay.py) as long as the cache plumbing is dropped:
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Caches and cache bookkeeping: a standalone replay must not read or write a KV cache.
# ``cache_position`` only indexes cache writes in the decoder layers of these families (the mask
# and the rotary embeddings were computed from it before the layers run), so it goes too.
DROP_LAYER_KWARGS: tuple[str, ...] = (
    "past_key_values",
    "past_key_value",
    "use_cache",
    "cache_position",
    "output_attentions",
)


def clean_layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs of a decoder layer that a standalone replay needs, detached.

    Keeps tensors (``attention_mask``, ``position_ids``), tuples of tensors
    (``position_embeddings`` = (cos, sin), M-RoPE already applied), None values and plain
    Python scalars/strings; drops caches (``DROP_LAYER_KWARGS``), ``hidden_states`` (the replay
    input) and anything else (objects the store could not serialize).
    """
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in DROP_LAYER_KWARGS or k == "hidden_states":
            continue
        if isinstance(v, torch.Tensor):
            out[k] = v.detach()
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t.detach() for t in v)
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
    return out


@torch.no_grad()
def capture_layer_io(
    model: nn.Module, layers: Sequence[nn.Module], inputs: dict[str, Any], use_cache: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """Run ``model(**inputs)`` once; return every layer's input and output hidden states
    (``[B, T, C]``) and the cleaned kwargs layer 0 received (all layers receive the same)."""
    ins: list[torch.Tensor | None] = [None] * len(layers)
    outs: list[torch.Tensor | None] = [None] * len(layers)
    kw: dict[str, Any] = {}
    handles = []

    def pre(i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            if i == 0:
                kw.update(clean_layer_kwargs(kwargs))

        return hook

    def post(i: int):
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
        model(**inputs, use_cache=use_cache)
    finally:
        for h in handles:
            h.remove()
    return ins, outs, kw  # type: ignore[return-value]
