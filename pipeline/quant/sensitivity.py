"""MBQ's gradient pass (METHODS.md §4): how much vision tokens matter to the answer, per layer.

On the fp model, with L = next-token cross-entropy on the answer tokens, we take g = dL/dY at
the output Y of each layer's o_proj (attention) and down_proj (MLP). Per sample,
``g_vis = mean |g|`` over vision positions (all channels) and ``g_ans = mean |g|`` over answer
positions; both are averaged over samples and ``r = g_vis / g_ans`` weights vision tokens in
the MBQ search loss.

Parameters are frozen for the pass (no parameter gradient is ever computed), the graph starts
at the input of the first decoder layer (a leaf swapped in by a pre-hook), and |g| is reduced in
a tensor hook as soon as it exists, so memory is the activations of one sample's forward.

Stats are plain JSON-able sums and counts so partial results merge: over samples, and over
the contiguous layer ranges of a sharded model (``range_sensitivity`` runs one shard's part of
the backward given the gradient of its output; chaining ranges last to first equals
``model_sensitivity`` on one device).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTN_OUT = "self_attn.o_proj"
MLP_OUT = "mlp.down_proj"
IGNORE_INDEX = -100
_KEYS = ("attn_vis", "attn_ans", "mlp_vis", "mlp_ans")

Stats = dict[int, dict[str, float]]  # layer -> {"attn_vis": sum of per-sample means, "attn_vis_n": count, ...}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens: position t predicts ``labels[t + 1]``."""
    logits = logits.reshape(-1, logits.shape[-1])[:-1]
    target = labels.reshape(-1)[1:].to(logits.device)
    if not (target != IGNORE_INDEX).any():
        raise ValueError("the sample has no answer tokens (labels are all -100 after the first)")
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


class HeadLoss(nn.Module):
    """The answer loss as a function of the last decoder layer's output (the last shard's loss_fn)."""

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module, labels: torch.Tensor):
        super().__init__()
        self.final_norm, self.lm_head = final_norm, lm_head
        self.labels = labels

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return answer_loss(self.lm_head(self.final_norm(hidden)), self.labels)


def empty_stats(layer_ids: Sequence[int]) -> Stats:
    return {int(i): {k: 0.0 for key in _KEYS for k in (key, f"{key}_n")} for i in layer_ids}


def merge_stats(*parts: Mapping[Any, Mapping[str, Any]], lazy: bool = False) -> Stats:
    """Add stats of several samples / shards (keys may be ints or JSON strings). Values may be
    device tensors (what the gradient hooks produce); ``lazy=True`` keeps sums as tensors (no host
    sync: merge a layer's samples, then :func:`stats_to_floats` once), else floats."""
    out: Stats = {}
    for part in parts:
        for i, d in part.items():
            acc = out.setdefault(int(i), {k: 0.0 for key in _KEYS for k in (key, f"{key}_n")})
            for k, v in d.items():
                acc[k] = acc[k] + (v if lazy and isinstance(v, torch.Tensor) else float(v))
    return out


def stats_to_floats(stats: Mapping[Any, Mapping[str, Any]]) -> Stats:
    return {int(i): {k: float(v) for k, v in d.items()} for i, d in stats.items()}


def ratios(stats: Mapping[Any, Mapping[str, float]], floor: str = "median") -> dict[int, dict[str, float]]:
    """``{layer: {"r_attn", "r_mlp"}}`` from accumulated stats.

    ``floor="median"``: each ratio is raised to at least its median over layers (MBQ's released
    code; statistics.median, i.e. the mean of the two middle values for an even layer count).
    A model whose samples have no vision tokens gets r = 1 (r then weighs nothing)."""
    if floor not in ("median", "none"):
        raise ValueError(f"sensitivity floor must be 'median' or 'none', got {floor!r}")
    stats = merge_stats(stats)
    out: dict[int, dict[str, float]] = {}
    for i, d in sorted(stats.items()):
        out[i] = {}
        for part in ("attn", "mlp"):
            if d[f"{part}_ans_n"] == 0:
                raise ValueError(f"layer {i}: no answer tokens reached the gradient pass")
            ans = d[f"{part}_ans"] / d[f"{part}_ans_n"]
            if d[f"{part}_vis_n"] == 0:
                out[i][f"r_{part}"] = 1.0
                continue
            if ans == 0:
                raise ValueError(f"layer {i}: zero gradient on answer tokens at {part} output")
            out[i][f"r_{part}"] = (d[f"{part}_vis"] / d[f"{part}_vis_n"]) / ans
    if floor == "median" and out:
        for key in ("r_attn", "r_mlp"):
            med = statistics.median(v[key] for v in out.values())
            for v in out.values():
                v[key] = max(v[key], med)
    return out


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` do not require grad inside; the flags are restored after."""
    params = {id(p): p for m in modules for p in m.parameters()}
    saved = [(p, p.requires_grad) for p in params.values()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _hook_outputs(layers: Sequence[nn.Module], layer_ids: Sequence[int], stats: Stats,
                  vision_mask: torch.Tensor, answer_mask: torch.Tensor) -> list:
    """Forward hooks on o_proj/down_proj that reduce the output gradient into ``stats``."""
    handles = []

    def reduce_into(i: int, part: str, grad: torch.Tensor) -> None:
        # masked means as device tensors: no host sync inside the backward (per sample and layer,
        # boolean indexing + .any() + float() were ~12 syncs that stalled the GPU's queue)
        g = grad.detach().reshape(-1, grad.shape[-1]).abs().float()
        for mask, key in ((vision_mask, "vis"), (answer_mask, "ans")):
            m = mask.reshape(-1).to(device=g.device, dtype=g.dtype)
            n = m.sum()
            has = (n > 0).to(g.dtype)
            stats[i][f"{part}_{key}"] = stats[i][f"{part}_{key}"] + (m @ g).sum() / (n * g.shape[1]).clamp(min=1) * has
            stats[i][f"{part}_{key}_n"] = stats[i][f"{part}_{key}_n"] + has

    def fwd(i: int, part: str):
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda grad: reduce_into(i, part, grad))

        return hook

    for layer, i in zip(layers, layer_ids):
        handles.append(layer.get_submodule(ATTN_OUT).register_forward_hook(fwd(int(i), "attn")))
        handles.append(layer.get_submodule(MLP_OUT).register_forward_hook(fwd(int(i), "mlp")))
    return handles


def model_sensitivity(
    model: nn.Module,
    layers: Sequence[nn.Module],
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    vision_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    layer_ids: Sequence[int] | None = None,
) -> Stats:
    """One sample (batch 1) through a model on one device: this sample's per-layer stats.

    ``inputs``: ``model(**inputs)`` kwargs (input_ids, pixel_values, ...); ``labels`` [1, T]
    (-100 outside the answer); masks [T] bool. Sum samples' stats with ``merge_stats``.
    """
    layer_ids = list(range(len(layers))) if layer_ids is None else list(layer_ids)
    stats = empty_stats(layer_ids)
    leaf: list[torch.Tensor] = []

    def swap_in_leaf(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = args[0] if args else kwargs["hidden_states"]
        x = h.detach().requires_grad_(True)
        leaf.append(x)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    handles = [layers[0].register_forward_pre_hook(swap_in_leaf, with_kwargs=True)]
    handles += _hook_outputs(layers, layer_ids, stats, vision_mask, answer_mask)
    try:
        with frozen(model), torch.enable_grad():
            logits = model(**inputs, use_cache=False).logits
            loss = answer_loss(logits, labels)
            torch.autograd.grad(loss, leaf[0])
    finally:
        for h in handles:
            h.remove()
    return stats_to_floats(stats)


def range_sensitivity(
    layers: Sequence[nn.Module],
    layer_ids: Sequence[int],
    hidden_in: torch.Tensor,
    layer_kwargs: Mapping[str, Any],
    vision_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    grad_out: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Stats]:
    """One shard's part of the gradient pass for one sample.

    Recomputes the forward of the contiguous ``layers`` from their fp input ``hidden_in``
    ([T, C] or [1, T, C]) with the decoder-layer kwargs, then backpropagates either
    ``grad_out`` (dL/d output, from the next shard) or, on the last shard, ``loss_fn(output)``
    (e.g. ``HeadLoss(norm, lm_head, labels)``). Returns (dL/d hidden_in, same shape as
    ``hidden_in``, for the previous shard; this range's stats, as device tensors so the pass never
    waits on the host: sum them with ``merge_stats(..., lazy=True)``, read them with ``stats_to_floats``).
    """
    if (grad_out is None) == (loss_fn is None):
        raise ValueError("pass exactly one of grad_out (inner shard) and loss_fn (last shard)")
    stats = empty_stats(layer_ids)
    handles = _hook_outputs(layers, layer_ids, stats, vision_mask, answer_mask)
    shape = hidden_in.shape
    try:
        head = [loss_fn] if isinstance(loss_fn, nn.Module) else []
        with frozen(*layers, *head), torch.enable_grad():
            x = hidden_in.detach().reshape(1, -1, shape[-1]).requires_grad_(True)
            h = x
            for layer in layers:
                out = layer(h, **layer_kwargs)
                h = out[0] if isinstance(out, tuple) else out
            if loss_fn is not None:
                (grad_in,) = torch.autograd.grad(loss_fn(h), x)
            else:
                (grad_in,) = torch.autograd.grad(h, x, grad_outputs=grad_out.reshape(h.shape).to(h.dtype))
    finally:
        for hd in handles:
            hd.remove()
    return grad_in.reshape(shape), stats
