"""The shard plan: contiguous decoder-layer ranges, one per GPU, balanced by bytes with headroom.

Pure arithmetic on a memory estimate (``pipeline.models.loading.estimate_memory``), so it is
testable without GPUs and `vlmq plan` needs only config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import VlmqError

GIB = 2**30


@dataclass
class ShardPlan:
    ranges: list[tuple[int, int]]  # [start, end) decoder layers per shard
    shard_bytes: list[int]  # weights per shard, the first also holding embeddings + vision, the last lm_head
    layer_bytes: list[int]
    headroom_bytes: int  # per GPU, left for activations and the search working set
    gpu_bytes: int
    extras: dict[str, int] = field(default_factory=dict)
    fits: bool = True
    worker: dict[str, int] = field(default_factory=dict)  # vlmq's own per-worker peaks (layer-streamed)

    @property
    def peak_bytes(self) -> list[int]:
        return [b + self.headroom_bytes for b in self.shard_bytes]


def plan_shards(layer_bytes: list[int], n_gpus: int, gpu_bytes: int, first_extra: int = 0,
                last_extra: int = 0, headroom_frac: float = 0.2, strict: bool = True) -> ShardPlan:
    """Split layers into at most ``n_gpus`` contiguous ranges minimizing the largest shard.

    Binary search on the capacity, then a greedy fill: optimal for contiguous partitions.
    """
    if n_gpus < 1:
        raise VlmqError(f"--gpus must be >= 1, got {n_gpus}")
    headroom = int(gpu_bytes * headroom_frac)
    cap_limit = gpu_bytes - headroom
    n = len(layer_bytes)
    n_shards = min(n_gpus, n)

    def fill(cap: int) -> list[tuple[int, int]] | None:
        ranges, start, acc = [], 0, first_extra
        for i, b in enumerate(layer_bytes):
            extra = last_extra if i == n - 1 else 0
            if acc + b + extra > cap and i > start:
                ranges.append((start, i))
                start, acc = i, 0
            acc += b + extra
            if acc > cap:
                return None
        ranges.append((start, n))
        return ranges if len(ranges) <= n_shards else None

    lo = max(max(layer_bytes), first_extra + layer_bytes[0])
    hi = sum(layer_bytes) + first_extra + last_extra
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    ranges = fill(lo)
    assert ranges is not None
    shard_bytes = []
    for k, (a, b) in enumerate(ranges):
        s = sum(layer_bytes[a:b]) + (first_extra if k == 0 else 0) + (last_extra if b == n else 0)
        shard_bytes.append(s)
    if max(shard_bytes) > cap_limit and not strict:
        return ShardPlan(ranges, shard_bytes, list(layer_bytes), headroom, gpu_bytes, fits=False)
    if max(shard_bytes) > cap_limit:
        need = max(shard_bytes) / (1 - headroom_frac) / GIB
        raise VlmqError(
            f"the model does not fit: the largest shard needs {max(shard_bytes) / GIB:.1f} GiB of weights "
            f"plus {headroom_frac:.0%} headroom, more than {gpu_bytes / GIB:.1f} GiB per GPU on {n_gpus} GPU(s)",
            f"use more GPUs (--gpus), or GPUs with at least {need:.0f} GiB",
        )
    return ShardPlan(ranges, shard_bytes, list(layer_bytes), headroom, gpu_bytes)


CUDA_CONTEXT_BYTES = 600 * 2**20  # a CUDA context + cuBLAS workspace, per worker process and GPU


def worker_peaks(config: dict, layer_bytes: list[int], other: dict[str, int], tokens: int,
                 act_bytes: int = 2) -> dict[str, int]:
    """What one vlmq worker holds at its peak (the capture and search hold one decoder layer):
    capture = head + one layer + one sample's activations; gradient (MBQ) = the same + one sample's
    fp32 logits and their gradient (2048 tokens); search = one layer + the inputs of its
    Linear groups for every calibration token (q/k/v, o, gate/up: hidden wide; down: intermediate)
    + the alpha grid's working copies of the gate/up weights."""
    text = config.get("text_config") or config
    hidden, inter = int(text["hidden_size"]), int(text.get("intermediate_size", 4 * int(text["hidden_size"])))
    layer = max(layer_bytes)
    head = sum(other.values())
    group_inputs = tokens * (3 * hidden + inter) * act_bytes
    vocab = int(text.get("vocab_size") or config.get("vocab_size") or 0)
    capture = head + layer + 4 * 2048 * hidden * act_bytes
    gradient = head + layer + 2 * 2048 * vocab * 4  # MBQ: one sample's fp32 logits and their gradient
    # the alpha grid's working copies (scaled, quantized, difference; fp32) of the largest group's
    # weights, gate/up: measured 5.2x (7B, H100) and 5.8x (72B, H200) its fp32 size on top of the rest
    grid = 6 * 2 * inter * hidden * 4
    search = layer + group_inputs + grid
    # A GPU hosts three workers at once (scheduler.GPU_LAYOUTS[3]): two capture workers beside a
    # search worker while capture lasts, three search workers after; each keeps a CUDA context.
    # Where that does not fit, two (one capture worker beside a search, or two searches).
    fixed = max(capture, gradient)
    per_gpu = max(2 * fixed + search, 3 * search) + 3 * CUDA_CONTEXT_BYTES
    per_gpu_two = max(fixed + search, 2 * search) + 2 * CUDA_CONTEXT_BYTES
    return {"head": head, "layer": layer, "capture": capture, "gradient": gradient, "search": search,
            "per_gpu": per_gpu, "per_gpu_two": per_gpu_two, "tokens": tokens}


def plan_from_model(model: str, n_gpus: int, gpu_mem_gib: float, dtype: str = "bfloat16",
                    tokens: int = 128 * 700) -> ShardPlan:
    import json
    from pathlib import Path

    import torch

    from ..models import detect_adapter
    from ..models.loading import estimate_memory

    if model.startswith("synthetic:"):
        from ..models.synthetic import synthetic_config

        config = synthetic_config(model.split(":", 1)[1])
    else:
        cfg = Path(model) / "config.json" if Path(model).is_dir() else Path(model)
        if not cfg.is_file():
            raise VlmqError(f"no config.json at {cfg}", "pass a model folder that holds config.json")
        config = json.loads(cfg.read_text())
    adapter = detect_adapter(config)
    est = estimate_memory(config, adapter, getattr(torch, dtype))
    first = sum(v for k, v in est.other_bytes.items() if k != "lm_head")
    plan = plan_shards(est.layer_bytes, n_gpus, int(gpu_mem_gib * GIB), first_extra=first,
                       last_extra=est.other_bytes.get("lm_head", 0), strict=False)
    plan.extras = dict(est.other_bytes)
    plan.worker = worker_peaks(config, est.layer_bytes, est.other_bytes, tokens)
    return plan


def format_plan(plan: ShardPlan) -> str:
    w = plan.worker
    lines = [f"{len(plan.layer_bytes)} decoder layers, {plan.layer_bytes[0] / GIB:.2f} GiB each (first); "
             f"other parts: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan.extras.items() if v)]
    if w:
        workers = workers_per_gpu(w, plan.gpu_bytes)
        gib = f"a {plan.gpu_bytes / GIB:.0f} GiB GPU"
        verdict = (f"fits {gib} with three workers" if workers == 3 else
                   f"fits {gib} with two workers (three do not)" if w["per_gpu_two"] <= plan.gpu_bytes * FIT else
                   f"does NOT fit {gib}")
        lines += ["", "vlmq quantize (one decoder layer resident per worker, any number of GPUs):",
                  f"  capture worker peak ~ {w['capture'] / GIB:.1f} GiB (head {w['head'] / GIB:.1f} + one layer "
                  f"{w['layer'] / GIB:.2f} + one sample's activations)",
                  f"  gradient pass (MBQ) ~ {w['gradient'] / GIB:.1f} GiB (head + one layer + one sample's fp32 "
                  f"logits and their gradient)",
                  f"  search worker peak  ~ {w['search'] / GIB:.1f} GiB (one layer + its group inputs for "
                  f"{w['tokens']} calibration tokens + the alpha grid's weight copies)",
                  f"  per GPU ~ {w['per_gpu'] / GIB:.1f} GiB (two capture workers beside a search worker, or "
                  f"three searches; CUDA contexts included); ~ {w['per_gpu_two'] / GIB:.1f} GiB with two workers",
                  f"  -> {verdict}; more GPUs divide the work, not the memory"
                  + ("" if verdict.startswith("fits") else
                     " (fewer calibration samples or tokens lower the search peak: --samples, --tokens-per-sample)")]
    lines += ["", f"layer-range shards over {len(plan.ranges)} GPU(s) (how the weights split for serving"
              + ("" if plan.fits else "; they do NOT fit at this size") + "):",
              f"{'shard':>5}  {'layers':>9}  {'weights GiB':>11}  {'peak GiB':>8}  (of {plan.gpu_bytes / GIB:.0f} GiB)"]
    for k, ((a, b), wb, p) in enumerate(zip(plan.ranges, plan.shard_bytes, plan.peak_bytes)):
        lines.append(f"{k:>5}  {a:>4}-{b - 1:<4}  {wb / GIB:>11.2f}  {p / GIB:>8.2f}")
    return "\n".join(lines)


FIT = 0.9  # of a GPU's memory: what the per-GPU estimate may take (allocator slack, fragmentation)


def workers_per_gpu(w: dict[str, int], gpu_bytes: int) -> int:
    """3 where three workers' estimate fits the GPU, else 2 (the scheduler's GPU_LAYOUTS keys)."""
    return 3 if w["per_gpu"] <= FIT * gpu_bytes else 2


def memory_preflight(config: dict, adapter: object, dtype: object, tokens: int,
                     gpu_bytes: int) -> tuple[str, bool, int]:
    """Before Ray starts: the per-worker and per-GPU peaks against this GPU's memory. Returns
    (a line for the job log, fatal, workers per GPU). Three workers share a GPU where their
    estimate fits, else two. Fatal only when the capture worker alone cannot fit (head + one
    layer: certain to fail whatever the data); the search's and the per-GPU peaks grow with the
    calibration tokens, which are only estimated here, so going over them is a warning."""
    from ..models.loading import estimate_memory

    est = estimate_memory(config, adapter, dtype)
    w = worker_peaks(config, est.layer_bytes, est.other_bytes, tokens)
    fixed = max(w["capture"], w["gradient"]) + CUDA_CONTEXT_BYTES
    workers = workers_per_gpu(w, gpu_bytes)
    per_gpu = w["per_gpu"] if workers == 3 else w["per_gpu_two"]
    line = (f"memory plan: capture worker {fixed / GIB:.1f} GiB, search worker ~ {w['search'] / GIB:.1f} GiB, "
            f"per GPU ~ {per_gpu / GIB:.1f} GiB ({workers} workers; ~{tokens} tokens), GPU {gpu_bytes / GIB:.0f} GiB")
    if workers == 2:
        line += f" (three workers would need ~{w['per_gpu'] / GIB:.1f} GiB)"
    if fixed > gpu_bytes:
        return line + ": one worker does not fit", True, workers
    if per_gpu > 0.95 * gpu_bytes:
        return line + ": tight, two workers per GPU may run out of memory (fewer --num-samples lowers it)", False, 2
    return line, False, workers
