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

    @property
    def peak_bytes(self) -> list[int]:
        return [b + self.headroom_bytes for b in self.shard_bytes]


def plan_shards(layer_bytes: list[int], n_gpus: int, gpu_bytes: int, first_extra: int = 0,
                last_extra: int = 0, headroom_frac: float = 0.2) -> ShardPlan:
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
    if max(shard_bytes) > cap_limit:
        need = max(shard_bytes) / (1 - headroom_frac) / GIB
        raise VlmqError(
            f"the model does not fit: the largest shard needs {max(shard_bytes) / GIB:.1f} GiB of weights "
            f"plus {headroom_frac:.0%} headroom, more than {gpu_bytes / GIB:.1f} GiB per GPU on {n_gpus} GPU(s)",
            f"use more GPUs (--gpus), or GPUs with at least {need:.0f} GiB",
        )
    return ShardPlan(ranges, shard_bytes, list(layer_bytes), headroom, gpu_bytes)


def plan_from_model(model: str, n_gpus: int, gpu_mem_gib: float, dtype: str = "bfloat16") -> ShardPlan:
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
                       last_extra=est.other_bytes.get("lm_head", 0))
    plan.extras = dict(est.other_bytes)
    return plan


def format_plan(plan: ShardPlan) -> str:
    lines = [f"{len(plan.layer_bytes)} decoder layers, {plan.layer_bytes[0] / GIB:.2f} GiB each (first); "
             f"other parts: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan.extras.items()),
             f"{'shard':>5}  {'layers':>9}  {'weights GiB':>11}  {'peak GiB':>8}  (of {plan.gpu_bytes / GIB:.0f} GiB)"]
    for k, ((a, b), w, p) in enumerate(zip(plan.ranges, plan.shard_bytes, plan.peak_bytes)):
        lines.append(f"{k:>5}  {a:>4}-{b - 1:<4}  {w / GIB:>11.2f}  {p / GIB:>8.2f}")
    return "\n".join(lines)
