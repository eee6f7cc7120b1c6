"""Where each stage runs: Ray placement for capture, block search, reference and gather.

No numerics here: every stage calls functions of ``pipeline.quant`` / ``pipeline.evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .capture import CaptureWorker
from .context import JobContext, worker_device
from .progress import JobView
from .runtime import RayContext
from .search import search_block

CAPTURE_BATCH = 8  # samples per capture call (progress granularity)
MAX_RETRIES = 3  # a lost worker's block is retried this many times


def _placement(ray_ctx: RayContext) -> dict[str, Any]:
    return {"num_gpus": 1} if ray_ctx.num_gpus else {"num_cpus": 1}


def run_capture(ctx: JobContext, ray_ctx: RayContext, table_path: str, n_layers: int, view: JobView) -> dict:
    import ray

    from ..data.collate import load_table

    n = load_table(table_path).num_rows
    worker = ray.remote(**_placement(ray_ctx))(CaptureWorker).remote(ctx)
    try:
        ray.get(worker.begin.remote())
        with view.task("capture", total=n) as advance:
            for start in range(0, n, CAPTURE_BATCH):
                rows = list(range(start, min(n, start + CAPTURE_BATCH)))
                stats = ray.get(worker.capture_batch.remote(table_path, rows))
                advance(len(rows), note=f"{stats['tokens']} tokens")
        return ray.get(worker.finish.remote())
    finally:
        ray.kill(worker)


def plan_blocks(n_layers: int, method: str) -> list[list[int]]:
    """One decoder layer per block; Q-VLM replaces this with its entropy partition."""
    return [[i] for i in range(n_layers)]


def run_search(ctx: JobContext, ray_ctx: RayContext, n_layers: int, view: JobView,
               sensitivity: dict[int, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    import ray

    blocks = plan_blocks(n_layers, ctx.recipe.method)
    task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, **_placement(ray_ctx))(search_block)
    pending = {}
    for b, ids in enumerate(blocks):
        sens = {i: sensitivity[i] for i in ids} if sensitivity else None
        pending[task.remote(ctx, b, ids, sens)] = b
    done: list[dict[str, Any]] = []
    with view.task(f"search ({ray_ctx.search_workers} workers)", total=len(blocks)) as advance:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                summary = ray.get(ref)
                done.append(summary)
                advance(1, note=f"block {summary['block']}")
    return sorted(done, key=lambda s: s["block"])


def part_paths(ctx: JobContext) -> list[str]:
    return sorted(str(p) for p in Path(ctx.parts_dir).glob("block_*.safetensors"))


def _reference_task(ctx: JobContext, parts: list[str], holdout_path: str) -> dict[str, Any]:
    from ..checkpoint.parts import read_part
    from ..evaluate.fidelity import reference_outputs
    from ..models import ADAPTERS
    from ..models.loading import build_model
    from .models import open_model_source

    adapter = ADAPTERS[ctx.family]
    source = open_model_source(ctx.model, ctx.allow_pickle)
    model = build_model(source, adapter, dtype=ctx.torch_compute_dtype, device=worker_device())

    def load_parts():
        quantized, replaced = {}, {}
        for p in parts:
            q, r, _ = read_part(p)
            quantized.update(q)
            replaced.update(r)
        return quantized, replaced

    from ..data.collate import load_table

    return reference_outputs(model, load_table(holdout_path), load_parts, act_bits=ctx.recipe.abits)


def reference(ctx: JobContext, ray_ctx: RayContext, holdout_path: str, view: JobView) -> dict[str, Any]:
    """fp and fake-quant outputs on held-out samples: fidelity numbers, and the reference the
    written checkpoint must reproduce."""
    import ray

    view.info("reference outputs and fidelity on held-out samples")
    task = ray.remote(max_retries=MAX_RETRIES, **_placement(ray_ctx))(_reference_task)
    return ray.get(task.remote(ctx, part_paths(ctx), holdout_path))


def gather(ctx: JobContext, spec: Any, prep: Any, ref: dict[str, Any], report: dict[str, Any],
           view: JobView) -> Path:
    """Part files + untouched source tensors -> the checkpoint (streamed, manifest last).

    The validation reference and the job report are written into the staging folder before the
    manifest, so they are hashed with everything else.
    """
    import json

    from ..checkpoint.parts import read_part_index
    from ..checkpoint.reference import write_reference
    from ..checkpoint.writer import write_checkpoint
    from ..evaluate.summary import checkpoint_bytes
    from .models import open_model_source

    source = open_model_source(ctx.model, ctx.allow_pickle)
    parts = part_paths(ctx)
    quantized = [n for p in parts for n in read_part_index(p).schemes]
    report["quantized_linears"] = len(quantized)
    report["quantized_layers"] = len({n.rsplit(".", 2)[0] for n in quantized})
    report["recipe_label"] = ctx.recipe.label
    linear_bytes = sum(source.nbytes(f"{n}.weight") for n in quantized)
    view.info(f"gather: {len(parts)} part files, {len(quantized)} quantized Linears")

    def stage_hook(staging: Path) -> None:
        if ref["inputs"]:  # --holdout 0: nothing to check outputs against
            write_reference(staging, ref["inputs"], ref["ref_logits"], fp_logits=ref["ref_fp_logits"],
                            model_dtype=ctx.torch_compute_dtype)
        report["sizes"] = {
            "before": sum(source.nbytes(k) for k in source.keys()),
            "after": checkpoint_bytes(staging),
            "quantized_linears_before": linear_bytes,
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str))

    recipe_info = dict(vars(ctx.recipe))
    recipe_info["label"] = ctx.recipe.label
    return write_checkpoint(
        spec.out, source, parts, recipe_info=recipe_info,
        act_bits=ctx.recipe.abits if ctx.recipe.abits < 16 else None,
        stage_hook=stage_hook, overwrite=spec.overwrite or spec.resume,
    )
