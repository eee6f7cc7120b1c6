"""A quantize job end to end: check -> calibration table -> capture -> search -> gather -> validate.

The seams are explicit so the scale-out work can replace one stage at a time: the capture
worker streams layer inputs into the activation store, blocks are independent Ray tasks that
write part files, and the gather reads part files only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import JobSpec
from ..errors import VlmqError
from .context import JobContext
from .faults import fault_from_env
from .progress import JobView


@dataclass
class Prepared:
    """Everything learned from cheap checks, before any model work."""

    model_ref: str
    family: str
    config: dict[str, Any]
    num_layers: int
    compute_dtype: str
    storage_dtype: str
    device: str
    memory_note: str | None = None  # the GPU memory plan, for the job log
    workers_per_gpu: int = 3  # the scheduler's GPU layout: 3 where the memory plan fits, else 2


@dataclass
class JobResult:
    out: Path
    report: dict[str, Any]
    stages: dict[str, float] = field(default_factory=dict)


def _pick_device(want: str) -> str:
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise VlmqError("--device cuda was asked for but no CUDA GPU is visible", "drop --device or pass --device cpu")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def _dtypes(config: dict[str, Any], want: str, device: str) -> tuple[str, str]:
    """(compute dtype, storage dtype). Storage follows the model's own 16-bit dtype; compute is
    that dtype on GPU and float32 on CPU (CPU half-precision matmuls are slow and inexact)."""
    text = config.get("text_config") or {}
    declared = str(config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
                   or text.get("dtype") or "float16").replace("torch.", "")
    storage = declared if declared in ("float16", "bfloat16") else "float16"
    if want != "auto":
        compute = want
    else:
        compute = storage if device == "cuda" else "float32"
    return compute, storage


def check_job(spec: JobSpec) -> Prepared:
    """Every check that can fail on user input, before Ray, before any model is built."""
    from ..data.sources import check_calib_source
    from ..models import detect_adapter
    from ..models.loading import check_group_size
    from .models import open_model_source, resolve_model

    from ..checkpoint.writer import check_output_dir

    check_calib_source(spec.calib, mode=calib_mode(spec))
    model_ref = resolve_model(spec.model, spec.work_path)
    check_output_dir(spec.out, spec.overwrite or spec.resume,
                     protect=[model_ref] if not model_ref.startswith("synthetic:") else [])
    source = open_model_source(model_ref, spec.allow_pickle)  # validates every safetensors header
    config = source.config_dict
    adapter = detect_adapter(config)
    r = spec.recipe
    check_group_size(config, adapter, r.group_size, lm_head=r.quantize_lm_head,
                     lm_head_group_size="same" if r.lm_head_group_size is None else r.head_group_size)
    device = _pick_device(spec.resources.device)
    compute, storage = _dtypes(config, spec.resources.dtype, device)
    n_layers = _num_layers(config, adapter)
    note, workers = _memory_preflight(spec, config, compute, device)
    return Prepared(model_ref, adapter.family, config, n_layers, compute, storage, device, note, workers)


def _memory_preflight(spec: JobSpec, config: dict[str, Any], compute_dtype: str,
                      device: str) -> tuple[str | None, int]:
    """On a GPU: refuse a model whose single worker cannot fit, before Ray and capture start, and
    pick how many workers share a GPU. Returns (the memory-plan line, workers per GPU)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None, 3
    from ..models import detect_adapter
    from .planner import memory_preflight

    tokens = spec.calib.num_samples * 700  # the planner's default sample length (calibration is not built yet)
    line, fatal, workers = memory_preflight(config, detect_adapter(config), getattr(torch, compute_dtype), tokens,
                                            torch.cuda.get_device_properties(0).total_memory)
    if fatal:
        raise VlmqError(line, "use a GPU with more memory (the capture worker holds the embeddings, the "
                              "vision tower, the LM head and one decoder layer); `vlmq plan` shows the estimate")
    return line, workers


def _num_layers(config: dict[str, Any], adapter: Any) -> int:
    text = config.get(adapter.text_config_attr) or config
    return int(text["num_hidden_layers"])


@contextmanager
def _stage(stages: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def run_quantize(spec: JobSpec, view: JobView | None = None) -> JobResult:
    """Run a whole job. Raises VlmqError on bad input before any expensive work."""
    from .jobstate import prepare_work_dir

    view = view or JobView()
    stages: dict[str, float] = {}
    with _stage(stages, "check"):
        prep = check_job(spec)
        if prep.memory_note:
            view.info(prep.memory_note)
        resuming = prepare_work_dir(spec, prep.model_ref)
    work = spec.work_path
    view.info(f"model {prep.model_ref} ({prep.family}, {prep.num_layers} decoder layers); "
              f"recipe {spec.recipe.label}; device {prep.device}; compute {prep.compute_dtype}"
              + ("; resuming" if resuming else ""))

    with _stage(stages, "calibration data"):
        table_path, holdout_path, data_report = build_tables(spec, prep, work, reuse=resuming)
    view.info(f"calibration: {data_report['calibration_rows']} rows + {data_report['holdout_rows']} held out, "
              f"{data_report.get('skipped_total', 0)} skipped {data_report.get('skipped') or ''}")

    from .runtime import init_ray, shutdown_ray

    with _stage(stages, "ray start"):
        ray_ctx = init_ray(spec.resources)
    try:
        from .scheduler import GPU_LAYOUTS, capture_groups

        layout = GPU_LAYOUTS[prep.workers_per_gpu]
        groups = stable_groups(work, resuming, capture_groups(ray_ctx, data_report["calibration_rows"], layout))
        ctx = JobContext(
            model=prep.model_ref, family=prep.family, recipe=spec.recipe, work_dir=str(work),
            store_root=spec.resources.store or str(work / "acts"), compute_dtype=prep.compute_dtype,
            storage_dtype=prep.storage_dtype, allow_pickle=spec.allow_pickle,
            store_max_bytes=int(spec.resources.store_max_gb * 2**30) if spec.resources.store_max_gb else None,
            options={"fault": fault_from_env(), "groups": groups, "workers_per_gpu": prep.workers_per_gpu,
                     "warm_workers": os.environ.get("VLMQ_WARM_WORKERS", "1") != "0"},
        )
        Path(ctx.parts_dir).mkdir(parents=True, exist_ok=True)
        from .stages import capture_and_search, gather, quantize_head, reference, run_veo

        if spec.recipe.veo:
            with _stage(stages, "veo"):
                overlay = run_veo(ctx, ray_ctx, table_path, view)
            ctx = dataclasses.replace(ctx, options={**ctx.options, "overlay": overlay})

        with _stage(stages, "capture + search"):
            summaries, extras = capture_and_search(ctx, ray_ctx, table_path, data_report["calibration_rows"],
                                                   prep.num_layers, view, resuming)
        head = None
        if spec.recipe.quantize_lm_head:
            with _stage(stages, "lm_head"):
                head = quantize_head(ctx, ray_ctx, view)
        with _stage(stages, "reference + fidelity"):
            ref = reference(ctx, ray_ctx, holdout_path, view)
        report = {
            "spec": spec.to_dict(),
            "model": prep.model_ref,
            "family": prep.family,
            "data": data_report,
            "blocks": summaries,
            "fidelity": ref["fidelity"],
            "stages_s": stages,
            "reference_s": ref.get("seconds"),
            **extras,
        }
        if head is not None:
            report["lm_head"] = head  # gather adds whether it is quantized and untied
        with _stage(stages, "gather"):
            out = gather(ctx, spec, prep, ref, report, view)
    finally:
        shutdown_ray(ray_ctx)
    with _stage(stages, "validate"):
        from ..checkpoint.validate import validate_checkpoint

        validation = validate_checkpoint(out, device=prep.device)
    from ..checkpoint.validate import format_report

    result = JobResult(out=out, report=report, stages=stages)
    report["validation"] = {"ok": validation.ok, "checks": [
        {"name": c.name, "status": c.status, "message": c.message, "seconds": c.numbers.get("seconds")}
        for c in validation.checks]}
    (work / "result.json").write_text(json.dumps(report, indent=2, default=str))
    if not validation.ok:
        raise VlmqError(f"the checkpoint written to {out} failed validation:\n{format_report(validation)}",
                        "this is a bug in vlmq; please report it with the work directory " + str(work))
    if not spec.keep_work:
        from ..data.store import ActivationStore

        ActivationStore(ctx.store_root).destroy()
    return result


GROUPS_FILE = "capture_groups.json"


def stable_groups(work: Path, resuming: bool, want: int) -> int:
    """The number of capture sample groups, fixed for the life of a work directory: a resumed job
    keeps the grouping its activation streams were written with (another GPU count or layout would
    split the rows differently, and a group's complete streams would then hold other samples)."""
    f = work / GROUPS_FILE
    if resuming and f.is_file():
        return int(json.loads(f.read_text())["groups"])
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"groups": int(want)}))
    tmp.replace(f)
    return int(want)


def calib_mode(spec: JobSpec) -> str:
    """``auto``: QA rows for the built-in model (it learned QA, never captions), else captions."""
    if spec.calib.mode != "auto":
        return spec.calib.mode
    return "qa" if spec.model in ("builtin", "builtin-outlier") else "caption"


def build_tables(spec: JobSpec, prep: Prepared, work: Path, reuse: bool = False) -> tuple[str, str, dict[str, Any]]:
    """Calibration and held-out tables through the model's own processor (driver-side, no model).
    A resumed job reuses the tables it built (same fingerprint, same data)."""
    tpath, hpath, rpath = work / "calib.arrow", work / "holdout.arrow", work / "data_report.json"
    if reuse and tpath.is_file() and hpath.is_file() and rpath.is_file():
        return str(tpath), str(hpath), json.loads(rpath.read_text())
    from ..data.collate import build_calibration_table, save_table, split_holdout
    from ..data.sources import open_calib_source
    from ..models import ADAPTERS
    from ..models.processors import load_processor

    adapter = ADAPTERS[prep.family]
    processor = load_processor(prep.model_ref)
    c = spec.calib
    source = open_calib_source(c, num_samples=c.num_samples + c.holdout, mode=calib_mode(spec))
    vision_id = adapter.image_token_id(_config_obj(prep))
    table, report = build_calibration_table(source.rows(), processor, vision_id, max_rows=c.num_samples + c.holdout,
                                            max_length=c.max_length)
    calib, holdout = split_holdout(table, min(c.holdout, max(0, table.num_rows - 1)), c.seed)
    save_table(calib, tpath)
    save_table(holdout, hpath)
    rep = report.to_dict()
    rep["calibration_rows"] = calib.num_rows
    rep["holdout_rows"] = holdout.num_rows
    rpath.write_text(json.dumps(rep, default=str))
    return str(tpath), str(hpath), rep


def _config_obj(prep: Prepared) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(prep.model_ref)
