"""Searching one block (one or more consecutive decoder layers) as a unit of Ray work.

A worker loads only its block's weights and its block's captured fp inputs, runs the method's
pure search function from ``pipeline.quant``, and writes a part file. Nothing else is shared.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from ..quant import get_search, needs_calibration
from ..quant.quantizer import QuantScheme
from ..quant.types import BlockCalib, Sample, SearchSettings
from .context import JobContext, worker_device, worker_peak
from .faults import maybe_fail

_MASK_KEYS = ("vision_mask", "answer_mask")


def recipe_scheme(ctx: JobContext) -> QuantScheme:
    r = ctx.recipe
    return QuantScheme(bits=r.wbits, group_size=r.group_size, symmetric=r.sym)


def head_scheme(ctx: JobContext) -> QuantScheme:
    """The packed lm_head's scheme: ``--lm-head-bits`` / ``--lm-head-group-size`` where given,
    else the decoder Linears'; symmetry always follows the recipe."""
    r = ctx.recipe
    return QuantScheme(bits=r.head_bits, group_size=r.head_group_size, symmetric=r.sym)


def load_block_calib(ctx: JobContext, first_layer: int, sensitivity: dict | None) -> BlockCalib:
    """The fp inputs of the block's first layer (every sample group), with each sample's
    shared metadata (layer kwargs, modality masks)."""
    from ..data.store import ActivationStore
    from .wavefront import group_root

    samples: list[Sample] = []
    for g in range(ctx.options.get("groups", 1)):
        store = ActivationStore(group_root(ctx.store_root, g))
        for chunk in store.iter_layer(first_layer):
            for sid, hidden in chunk:
                meta = store.get_meta(sid)
                masks = {k: meta.pop(k) for k in _MASK_KEYS}
                samples.append(Sample(hidden=hidden, layer_kwargs=meta, **masks))
    return BlockCalib(samples=samples, sensitivity=sensitivity)


def search_block(ctx: JobContext, block_id: int, layer_ids: list[int],
                 sensitivity: dict | None = None) -> dict[str, Any]:
    """Search one block and write its part file. Returns a small JSON-able summary."""
    from ..checkpoint.parts import write_part
    from ..models import ADAPTERS
    from ..models.loading import build_layers
    from .models import job_source

    maybe_fail(ctx.options.get("fault"), "search", block_id, ctx.work_dir)
    t0 = time.perf_counter()
    device = worker_device()
    adapter = ADAPTERS[ctx.family]
    source = job_source(ctx)
    layers = build_layers(source, adapter, layer_ids, dtype=ctx.torch_compute_dtype, device=device)
    method = ctx.recipe.method
    calib = load_block_calib(ctx, layer_ids[0], sensitivity) if needs_calibration(method) else None
    settings = SearchSettings(
        scheme=recipe_scheme(ctx),
        groups=adapter.linear_groups,
        scale_dtype=ctx.torch_storage_dtype,
        abits=ctx.recipe.abits,
        options=dict(vars(ctx.recipe)),
        device=device,
    )
    t1 = time.perf_counter()
    with contextlib.nullcontext() if _needs_grad(method) else torch.no_grad():
        result = get_search(method)(layers, layer_ids, calib, settings)
    t2 = time.perf_counter()
    write_part(ctx.part_path(block_id), result, full_name=lambda k: f"{adapter.layers_path}.{k}")
    return {
        "block": block_id,
        "layers": layer_ids,
        "metrics": result.metrics,
        "load_s": t1 - t0,
        "search_s": t2 - t1,
        "write_s": time.perf_counter() - t2,
        **worker_peak(),
    }


def warm_worker(ctx: JobContext) -> dict[str, Any]:
    """Pay a search worker's one-time costs while capture still runs: the imports a search needs,
    the CUDA context and cuBLAS handle on its GPU, and the model's meta description (cached per
    process). Run in a GPU slot that capture leaves free, it leaves an idle warm worker that
    Ray hands the first search to, instead of starting one cold when the search phase begins."""
    t0 = time.perf_counter()
    from ..checkpoint.parts import write_part  # noqa: F401  (search_block's imports: importing is the point)
    from ..models.loading import build_layers  # noqa: F401
    from .models import job_source

    device = worker_device()
    job_source(ctx)  # the meta model, cached per process
    if device.type == "cuda":
        x = torch.ones(64, 64, device=device, dtype=ctx.torch_compute_dtype)
        (x @ x).sum().item()  # CUDA context and cuBLAS handle
    return {"warm_s": time.perf_counter() - t0, **worker_peak()}


def _needs_grad(method: str) -> bool:
    return method.startswith("qvlm")

