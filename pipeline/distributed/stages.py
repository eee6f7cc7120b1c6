"""Where each stage runs: Ray placement for capture, block search, reference and gather.

No numerics here: every stage calls functions of ``pipeline.quant`` / ``pipeline.evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .context import JobContext, worker_device
from .progress import JobView
from .runtime import RayContext
from .scheduler import placement
from .search import search_block
from .wavefront import save_json

MAX_RETRIES = 3  # a lost worker's block is retried this many times
SENSITIVITY_FILE = "sensitivity.json"
PARTITION_FILE = "partition.json"
OVERLAP_METHODS = ("rtn", "awq", "smoothquant")  # blocks known before capture: search overlaps it


def plan_blocks(n_layers: int, method: str) -> list[list[int]]:
    """One decoder layer per block (Q-VLM's blocks come from its partition)."""
    return [[i] for i in range(n_layers)]


def qvlm_partition(ctx: JobContext, stats: list[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    """Merge the capture's per-layer entropy counts over sample groups and partition on them."""
    from ..quant.entropy import EntropyAccumulator, EntropyProfile
    from ..quant.partition import partition, quantile_threshold

    r = ctx.recipe
    if r.partition == "fixed":
        blocks = partition([0.0] * n_layers, r.p, r.max_block_layers, "fixed")
        return {"mode": "fixed", "blocks": blocks, "scores": [0.0] * n_layers, "tau": None}
    per_layer: dict[int, Any] = {}
    for s in stats:
        if "entropy" in s and s.get("layer", -1) >= 0:
            acc = EntropyAccumulator.from_dict(s["entropy"])
            per_layer[s["layer"]] = acc if s["layer"] not in per_layer else per_layer[s["layer"]].merge(acc)
    missing = [i for i in range(n_layers) if i not in per_layer]
    if missing:
        raise RuntimeError(f"entropy counts missing for layers {missing[:5]}")
    profile = EntropyProfile.from_accumulators([per_layer[i] for i in range(n_layers)])
    scores = profile.scores(r.partition)
    return {"mode": r.partition, "p": r.p, "max_block_layers": r.max_block_layers,
            "tau": quantile_threshold(scores, r.p), "scores": scores,
            "entropies": profile.entropies(), "dependencies": profile.dependencies(),
            "blocks": partition(scores, r.p, r.max_block_layers, r.partition)}


def finished_blocks(ctx: JobContext, blocks: list[list[int]] | None) -> set[int]:
    """Blocks whose part file exists (parts are written atomically, so existing means complete)."""
    from ..checkpoint.parts import read_part_index

    done = set()
    for p in Path(ctx.parts_dir).glob("block_*.safetensors"):
        b = int(p.stem.split("_")[1])
        try:
            read_part_index(p)
        except Exception:  # unreadable: redo it
            continue
        if blocks is None or b < len(blocks):
            done.add(b)
    return done


def capture_and_search(ctx: JobContext, ray_ctx: RayContext, table_path: str, n_rows: int, n_layers: int,
                       view: JobView, resuming: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the capture wavefront and every block search; returns (block summaries, report extras)."""
    from ..quant import needs_calibration
    from .scheduler import CaptureAndSearch, peak_gpu_by_worker
    from .wavefront import needs_last_stream

    method = ctx.recipe.method
    work = Path(ctx.work_dir)
    qvlm = method.startswith("qvlm")
    saved_part = work / PARTITION_FILE
    known_part = json.loads(saved_part.read_text()) if resuming and qvlm and saved_part.is_file() else None
    early = plan_blocks(n_layers, method) if method in OVERLAP_METHODS else None
    if qvlm and ctx.recipe.partition == "fixed" and method == "qvlm":
        early = qvlm_partition(ctx, [], n_layers)["blocks"]  # known up front: search overlaps capture
    if known_part is not None:
        early = known_part["blocks"] if method == "qvlm" else None
    extras: dict[str, Any] = {}
    saved_sens = work / SENSITIVITY_FILE
    known = json.loads(saved_sens.read_text()) if resuming and saved_sens.is_file() else None

    def after_capture(stats: list[dict[str, Any]]) -> tuple[list[list[int]], dict | None]:
        sens = None
        if needs_last_stream(method):
            if known is not None:
                sens = {int(k): v for k, v in known["ratios"].items()}
            else:
                from ..quant.sensitivity import merge_stats, ratios

                merged = merge_stats(*[s["stats"] for s in stats if "stats" in s])
                sens = ratios(merged, ctx.recipe.sensitivity_floor)
                save_json(saved_sens, {"ratios": sens, "unfloored": ratios(merged, "none"),
                                       "floor": ctx.recipe.sensitivity_floor})
            view.info("MBQ sensitivity r_attn " + " ".join(f"{v['r_attn']:.2f}" for v in sens.values()))
        if qvlm:
            part = known_part or qvlm_partition(ctx, stats, n_layers)
            save_json(saved_part, part)
            view.info(f"Q-VLM partition ({part['mode']}): {len(part['blocks'])} blocks "
                      + " ".join("-".join(map(str, (b[0], b[-1]))) if len(b) > 1 else str(b[0]) for b in part["blocks"]))
            return part["blocks"], sens
        return early or plan_blocks(n_layers, method), sens

    need_entropy = qvlm and known_part is None and ctx.recipe.partition != "fixed"
    ctx = dataclasses.replace(ctx, options={**ctx.options, "entropy": need_entropy})
    done = finished_blocks(ctx, early) if resuming else set()
    if done:
        view.info(f"resume: {len(done)} blocks already done")
    sched = CaptureAndSearch(ctx, ray_ctx, table_path, n_rows, n_layers, view, done, search_block)
    summaries = sched.run(early, after_capture, capture=needs_calibration(method),
                          known_sensitivity=known is not None)
    if saved_sens.is_file():
        extras["sensitivity"] = json.loads(saved_sens.read_text())
    if qvlm and saved_part.is_file():
        extras["partition"] = json.loads(saved_part.read_text())
    extras["resumed_blocks"] = sorted(done)
    extras["phases_s"] = {k: round(v, 2) for k, v in sched.events.items()}
    if sched.warm_stats:
        extras["phases_s"]["search worker warm-up (during capture)"] = round(max(w["warm_s"] for w in sched.warm_stats), 2)
    extras["worker_pids"] = {role: sorted({r["pid"] for r in recs if "pid" in r}) for role, recs in
                             (("capture", sched.capture_stats), ("warm", sched.warm_stats), ("search", summaries))}
    extras["gpu_use"] = {  # which GPU each kind of work ran on: shows a multi-GPU job was spread
        role: dict(sorted(Counter(str(r["gpu"]) for r in recs if "gpu" in r).items()))
        for role, recs in (("capture steps", sched.capture_stats), ("searches", summaries))}
    peaks = peak_gpu_by_worker(sched.capture_stats + summaries + sched.warm_stats)
    extras["resources"] = {"peak_store_bytes": sched.peak_store_bytes,
                           "peak_gpu_bytes_per_worker": sorted(peaks.values(), reverse=True)}
    if peaks:
        view.info(f"peak GPU memory per worker: max {max(peaks.values()) / 2**30:.1f} GiB over {len(peaks)} "
                  f"workers; peak activation store {sched.peak_store_bytes / 2**30:.2f} GiB")
    return summaries, extras


HEAD_PART = "head.safetensors"  # the quantized lm_head's part file (recipe.quantize_lm_head)


def head_part_path(ctx: JobContext) -> Path:
    return Path(ctx.parts_dir) / HEAD_PART


def part_paths(ctx: JobContext) -> list[str]:
    """Every part file the checkpoint is gathered from: the blocks', then the lm_head's if any."""
    blocks = sorted(str(p) for p in Path(ctx.parts_dir).glob("block_*.safetensors"))
    head = head_part_path(ctx)
    return blocks + ([str(head)] if ctx.recipe.quantize_lm_head and head.is_file() else [])


def _head_task(ctx: JobContext, out_path: str) -> dict[str, Any]:
    """Quantize the lm_head (``quant.head``) on a worker and write its part file; the weight is
    read from the untied view, so a tied model's head is the embedding table's copy."""
    import torch

    from ..checkpoint.parts import write_part
    from ..models import ADAPTERS
    from ..quant.head import quantize_lm_head
    from .models import job_source
    from .search import head_scheme

    t0 = time.perf_counter()
    adapter = ADAPTERS[ctx.family]
    device = worker_device()
    source = job_source(ctx, head=True)
    w = source.get(f"{adapter.lm_head_path}.weight").to(device)
    with torch.no_grad():
        result = quantize_lm_head(w, head_scheme(ctx), ctx.torch_storage_dtype, adapter.lm_head_path)
    write_part(out_path, result, full_name=lambda k: k)
    return {**result.metrics, "task_s": round(time.perf_counter() - t0, 3)}


def quantize_head(ctx: JobContext, ray_ctx: RayContext, view: JobView) -> dict[str, Any] | None:
    """``recipe.quantize_lm_head``: the lm_head's part file (kept across --resume: parts are
    atomic). Returns its metrics for the report, or None when the recipe keeps the head fp16.

    A kept part is reused only when it holds the head in the scheme this job asks for: the head
    fields are not in the resume fingerprint (no block depends on them), so a job resumed with
    another ``--lm-head-bits`` / ``--lm-head-group-size`` finds the old head here and redoes it."""
    import ray

    from ..checkpoint.parts import read_part_index
    from ..models import ADAPTERS
    from .search import head_scheme

    if not ctx.recipe.quantize_lm_head:
        return None
    out = head_part_path(ctx)
    name, want = ADAPTERS[ctx.family].lm_head_path, head_scheme(ctx)
    if out.is_file():
        try:
            index = read_part_index(out)
        except Exception:  # unreadable: redo it
            index = None
        if index is not None and index.schemes == {name: want}:
            return {**index.metrics, "resumed": True}
        if index is not None:
            old = ", ".join(f"{m} {_scheme_words(s)}" for m, s in index.schemes.items())
            view.info(f"resume: the kept lm_head part holds {old}; this job wants {_scheme_words(want)}: redoing it")
        out.unlink()
    task = ray.remote(max_retries=MAX_RETRIES, **placement(ray_ctx, share=1.0))(_head_task)
    metrics = ray.get(task.remote(ctx, str(out)))
    view.info(f"lm_head {metrics['shape'][0]}x{metrics['shape'][1]} quantized (RTN, {_scheme_words(want)}): "
              f"relative weight error {metrics['rel_weight_error']:.4g}")
    return metrics


def _scheme_words(s: Any) -> str:
    return f"W{s.bits} {'ch' if s.group_size is None else f'g{s.group_size}'}{' sym' if s.symmetric else ''}"


REFERENCE_POSITIONS = 32


def _reference_task(ctx: JobContext, parts: list[str], holdout_path: str, n_reference: int = 4) -> dict[str, Any]:
    """fp and fake-quant logits of the held-out samples, decoder layers streamed one at a time
    (so the reference of a 72B model needs one layer of memory, like the capture)."""
    t_start = time.perf_counter()
    import torch

    from ..checkpoint.parts import PartModules
    from ..data.collate import load_table, row_masks, row_to_model_inputs
    from ..evaluate.fidelity import logit_fidelity, merge_fidelity, prediction_masks
    from ..evaluate.streamed import OverlaySource, act_quant_hook, streamed_logits
    from ..models import ADAPTERS
    from .models import job_source

    adapter = ADAPTERS[ctx.family]
    source = job_source(ctx, head=True)  # a packed lm_head overlays the untied head, as written
    table = load_table(holdout_path)
    inputs = [row_to_model_inputs(table, r) for r in range(table.num_rows)]
    masks = []
    for r in range(table.num_rows):
        m = row_masks(table, r)
        masks.append(prediction_masks(m["answer_mask"], m["vision_mask"]))
    device, dtype = worker_device(), ctx.torch_compute_dtype
    t0 = time.perf_counter()
    fp = streamed_logits(source, adapter, inputs, dtype, device)
    t1 = time.perf_counter()
    quantized = PartModules(parts, device)
    q = streamed_logits(OverlaySource(source, quantized, quantized.replaced), adapter, inputs, dtype, device,
                        layer_hook=act_quant_hook(ctx.recipe.abits))
    t2 = time.perf_counter()
    fidelity = {k: merge_fidelity([logit_fidelity(a, b, m[k]) for a, b, m in zip(fp, q, masks)])
                for k in ("answer", "text")}
    seconds = {"setup": round(t0 - t_start, 2), "fp pass": round(t1 - t0, 2),
               "fake-quant pass": round(t2 - t1, 2), "fidelity": round(time.perf_counter() - t2, 2)}
    # the stored reference keeps the last REFERENCE_POSITIONS positions (the answer's end): full
    # logits of a real vocabulary are 0.4 GB a sample and would dominate the checkpoint's write
    positions = [torch.arange(max(0, x.shape[0] - REFERENCE_POSITIONS), x.shape[0]) for x in q[:n_reference]]
    return {"fidelity": fidelity, "inputs": inputs[:n_reference], "positions": positions, "seconds": seconds,
            "ref_logits": [x[p] for x, p in zip(q, positions)],
            "ref_fp_logits": [x[p] for x, p in zip(fp, positions)]}


def _veo_task(ctx: JobContext, table_path: str, out_path: str) -> dict[str, Any]:
    """Q-VLM's visual-encoder optimization against an RTN fake-quant LLM (cheap), before capture,
    so the capture, the partition and the search all see the tuned projector. Holds the fp and
    the fake-quant model together: for models that fit one device."""
    from safetensors.torch import save_file

    from ..data.collate import load_table, row_labels, row_masks, row_to_model_inputs
    from ..evaluate.streamed import to_device
    from ..models import ADAPTERS
    from ..models.loading import build_model
    from ..quant.apply import apply_fake_quant
    from ..quant.rtn import search_rtn
    from ..quant.types import SearchSettings
    from ..quant.veo import optimize_projector
    from .models import open_model_source
    from .search import recipe_scheme

    adapter = ADAPTERS[ctx.family]
    device, dtype = worker_device(), ctx.torch_compute_dtype
    source = open_model_source(ctx.model, ctx.allow_pickle)
    fp = build_model(source, adapter, dtype=dtype, device=device)
    q = build_model(source, adapter, dtype=dtype, device=device)
    layers = q.get_submodule(adapter.layers_path)
    rtn = search_rtn(list(layers), list(range(len(layers))), None,
                     SearchSettings(recipe_scheme(ctx), adapter.linear_groups, ctx.torch_storage_dtype))
    apply_fake_quant(q, {f"{adapter.layers_path}.{k}": v for k, v in rtn.quantized.items()}, {}, ctx.recipe.abits)
    table = load_table(table_path)
    inputs = []
    for r in range(min(table.num_rows, ctx.recipe.veo_samples)):
        inp = to_device(row_to_model_inputs(table, r), device, dtype)
        inp["labels"] = row_labels(table, r).to(device)
        inp["vision_mask"] = row_masks(table, r)["vision_mask"].to(device)
        inputs.append(inp)
    new, log = optimize_projector(fp, q, inputs, adapter.projector_path, adapter.layers_path,
                                  {"steps": ctx.recipe.veo_steps, "eta": ctx.recipe.veo_eta})
    save_file({k: v.detach().to("cpu").contiguous() for k, v in new.items()}, out_path)
    return {k: v for k, v in log.items() if not isinstance(v, list)}


def run_veo(ctx: JobContext, ray_ctx: RayContext, table_path: str, view: JobView) -> str:
    """Tune the projector once (kept across --resume); returns the overlay file."""
    import ray

    out = Path(ctx.work_dir) / "veo_projector.safetensors"
    if not out.is_file():
        view.info(f"visual-encoder optimization: {ctx.recipe.veo_steps} steps on {ctx.recipe.veo_samples} samples")
        task = ray.remote(max_retries=MAX_RETRIES, **placement(ray_ctx, share=1.0))(_veo_task)
        log = ray.get(task.remote(ctx, table_path, str(out)))
        save_json(Path(ctx.work_dir) / "veo.json", log)
    return str(out)


def reference(ctx: JobContext, ray_ctx: RayContext, holdout_path: str, view: JobView) -> dict[str, Any]:
    """fp and fake-quant outputs on held-out samples: fidelity numbers, and the reference the
    written checkpoint must reproduce."""
    import ray

    view.info("reference outputs and fidelity on held-out samples")
    task = ray.remote(max_retries=MAX_RETRIES, **placement(ray_ctx, share=1.0))(_reference_task)
    t0 = time.perf_counter()
    out = ray.get(task.remote(ctx, part_paths(ctx), holdout_path))
    # what the task did not time itself: scheduling, a worker start, moving the result back
    out["seconds"]["outside the task"] = round(time.perf_counter() - t0 - sum(out["seconds"].values()), 2)
    return out


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

    from ..models import ADAPTERS

    base = open_model_source(ctx.model, ctx.allow_pickle)
    source = base
    adapter = ADAPTERS[ctx.family]
    if ctx.recipe.quantize_lm_head:  # a tied model is written untied: fp16 embeddings + packed head
        from ..models.loading import untie_lm_head

        source = untie_lm_head(base, adapter)
    parts = part_paths(ctx)
    quantized = [n for p in parts for n in read_part_index(p).schemes]
    report["quantized_linears"] = len(quantized)
    report["quantized_layers"] = len({n.rsplit(".", 2)[0] for n in quantized if n != adapter.lm_head_path})
    report["recipe_label"] = ctx.recipe.label
    head = adapter.lm_head_path
    report["lm_head"] = {"quantized": head in quantized, "module": head,
                         "untied": source is not base, **(report.get("lm_head") or {})}
    linear_bytes = sum(source.nbytes(f"{n}.weight") for n in quantized)
    view.info(f"gather: {len(parts)} part files, {len(quantized)} quantized Linears")

    def stage_hook(staging: Path) -> None:
        if ref["inputs"]:  # --holdout 0: nothing to check outputs against
            write_reference(staging, ref["inputs"], ref["ref_logits"], fp_logits=ref["ref_fp_logits"],
                            model_dtype=ctx.torch_compute_dtype, positions=ref.get("positions"))
        report["sizes"] = {
            "before": sum(base.nbytes(k) for k in base.keys()),  # a tied head counts once, as stored
            "after": checkpoint_bytes(staging),
            "quantized_linears_before": linear_bytes,
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str))
        from ..evaluate.job_report import render

        render(report, staging / "report")  # report/report.md + plots, hashed with the rest

    recipe_info = dict(vars(ctx.recipe))
    recipe_info["label"] = ctx.recipe.label
    overlay = None
    if ctx.options.get("overlay"):  # VEO's tuned projector goes into the checkpoint
        from safetensors.torch import load_file

        overlay = load_file(ctx.options["overlay"])
    timings: dict[str, float] = {}
    out = write_checkpoint(
        spec.out, source, parts, replaced=overlay, recipe_info=recipe_info,
        act_bits=ctx.recipe.abits if ctx.recipe.abits < 16 else None,
        stage_hook=stage_hook, overwrite=spec.overwrite or spec.resume, timings=timings,
    )
    report["gather_s"] = timings  # in result.json (the checkpoint's report.json was written before the manifest)
    return out
