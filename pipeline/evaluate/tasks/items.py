"""The evaluation matrix: work items (checkpoint x task x shard), running one, storing results.

Ray-free: ``distributed.fleet`` moves items to workers and calls :func:`run_item` there.

- An item's ``id`` hashes the checkpoint's fingerprint, the task's key (source, size, seed), the
  shard bounds and the backend: re-running ``vlmq eval`` with the same arguments finds the same
  ids, and a checkpoint that was rewritten gets new ones.
- Every finished item is one JSON file ``DIR/items/<id>.json`` written atomically (temp, fsync,
  rename). An ``ok`` file is never recomputed; an ``error`` file is retried on the next run.
- :func:`assemble` merges shard records per (checkpoint, task) and scores them with the task's
  pure ``aggregate``: results never depend on sharding or on which worker ran what.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .base import RunContext, Task
from .checkpoints import CheckpointRef, ModelCache, base_name, folder_kind, reference_path

ITEMS_DIR = "items"


class ReferenceUnavailable(Exception):
    """The fp model a fidelity item compares against cannot be found or loaded."""


@dataclass(frozen=True)
class WorkItem:
    id: str
    ckpt: CheckpointRef
    task: Task
    shard: int
    n_shards: int
    start: int
    stop: int
    backend: str = "fake"

    def describe(self) -> str:
        return f"{self.ckpt.name} x {self.task.name} [{self.shard + 1}/{self.n_shards}]"


def item_id(ckpt: CheckpointRef, task: Task, start: int, stop: int, backend: str) -> str:
    key = json.dumps([ckpt.path, ckpt.fingerprint, task.key, start, stop, backend, ckpt.reference])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def build_matrix(ckpts: list[CheckpointRef], tasks: list[Task], backend: str = "fake") -> list[WorkItem]:
    """Every (checkpoint, task, shard), grouped by checkpoint so a worker's cache stays warm."""
    items = []
    for c in ckpts:
        for t in tasks:
            n = max(1, t.size())
            bounds = list(range(0, n, t.shard_size)) + [n]
            n_shards = len(bounds) - 1
            for s in range(n_shards):
                a, b = bounds[s], bounds[s + 1]
                items.append(WorkItem(item_id(c, t, a, b, backend), c, t, s, n_shards, a, b, backend))
    return items


# ----------------------------------------------------------------------------- running one item


def worker_device() -> torch.device:
    from ...models.loading import shape_stable_attention

    shape_stable_attention()  # every item has new sequence lengths: no per-length cuDNN plans
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def run_item(item: WorkItem, cache: ModelCache, device: torch.device | None = None) -> dict[str, Any]:
    """Run one item; never raises. ``status`` is ``ok`` or ``error`` (``stage``: load / reference / run)."""
    device = device or worker_device()
    t0 = time.perf_counter()
    base = {"id": item.id, "checkpoint": item.ckpt.name, "task": item.task.name, "shard": item.shard,
            "n_shards": item.n_shards, "start": item.start, "stop": item.stop}
    try:
        model, processor = cache.get(item.ckpt.path, item.ckpt.kind, item.backend, device)
    except Exception as e:
        return {**base, "status": "error", "stage": "load", "error": f"cannot load checkpoint {item.ckpt.spec}: "
                f"{_message(e)}", "seconds": time.perf_counter() - t0}
    dtype = next(model.parameters()).dtype
    if item.task.kind == "speed":
        cache.keep_only(item.ckpt.path)

    def reference() -> tuple[torch.nn.Module, Any]:
        ref = reference_path(item.ckpt)
        if ref is None:
            raise ReferenceUnavailable(f"no fp model known for {item.ckpt.spec}: pass --fp-model PATH (or 'builtin')")
        if ref == item.ckpt.path:
            return model, processor
        try:
            return cache.get(ref, folder_kind(ref), "fake", device)
        except Exception as e:
            raise ReferenceUnavailable(f"cannot load the fp model {ref}: {_message(e)}") from None

    ctx = RunContext(model, processor, item.ckpt, device, dtype, cache=_task_cache(cache), reference=reference)
    try:
        records = item.task.run(ctx, item.start, item.stop)
    except ReferenceUnavailable as e:
        return {**base, "status": "error", "stage": "reference", "error": str(e),
                "seconds": time.perf_counter() - t0}
    except Exception as e:
        return {**base, "status": "error", "stage": "run", "error": _message(e),
                "traceback": traceback.format_exc(limit=6), "seconds": time.perf_counter() - t0}
    return {**base, "status": "ok", "records": records, "seconds": time.perf_counter() - t0}


def _task_cache(cache: ModelCache) -> dict[str, Any]:
    if not hasattr(cache, "task_data"):
        cache.task_data = {}  # type: ignore[attr-defined]
    return cache.task_data  # type: ignore[attr-defined]


def _message(e: BaseException) -> str:
    problem = getattr(e, "problem", None)
    fix = getattr(e, "fix", None)
    if problem:
        return problem + (f" (fix: {fix})" if fix else "")
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- the result store


class ItemStore:
    """``DIR/items/<id>.json``, one per finished item."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir) / ITEMS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, iid: str) -> Path:
        return self.dir / f"{iid}.json"

    def load(self, iid: str) -> dict[str, Any] | None:
        p = self.path(iid)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError:  # torn by a crash mid-write of a non-atomic copy: redo it
            return None

    def done(self, items: list[WorkItem]) -> dict[str, dict[str, Any]]:
        """Stored ``ok`` results of these items (errors are retried)."""
        out = {}
        for it in items:
            r = self.load(it.id)
            if r is not None and r.get("status") == "ok":
                out[it.id] = r
        return out

    def save(self, result: dict[str, Any]) -> None:
        p = self.path(result["id"])
        tmp = p.with_suffix(f".tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(result, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


# ----------------------------------------------------------------------------- assembling rows


def assemble(items: list[WorkItem], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (checkpoint, task): merged shard records scored by the task, or the error."""
    groups: dict[tuple[str, str], list[WorkItem]] = {}
    for it in items:
        groups.setdefault((it.ckpt.path, it.task.key), []).append(it)
    rows = []
    for its in groups.values():
        ckpt, task = its[0].ckpt, its[0].task
        res = [results.get(it.id) for it in sorted(its, key=lambda i: i.shard)]
        row: dict[str, Any] = {"checkpoint": ckpt.name, "task": task.name, "kind": task.kind,
                               "path": ckpt.path, "checkpoint_kind": ckpt.kind, "method": ckpt.method,
                               "wbits": ckpt.wbits, "abits": ckpt.abits, "group_size": ckpt.group_size,
                               "label": ckpt.label, "sym": ckpt.sym, "base": base_name(ckpt),
                               "weight_bytes": ckpt.weight_bytes,
                               "shards": len(its), "seconds": sum(r.get("seconds", 0.0) for r in res if r)}
        errors = [r for r in res if r is not None and r.get("status") != "ok"]
        missing = sum(r is None for r in res)
        if errors or missing:
            row["status"] = "error"
            row["error"] = errors[0]["error"] if errors else f"{missing} of {len(res)} shards did not finish"
            row["failed_shards"] = len(errors) + missing
        else:
            records = [rec for r in res for rec in r["records"]]  # type: ignore[index]
            metrics = task.aggregate(records)
            row["status"] = "ok"
            row["metrics"] = metrics
            if "accuracy" in metrics:
                row["accuracy"] = metrics["accuracy"]
            if "per_skill" in metrics:
                row["per_skill"] = metrics["per_skill"]
            name, value = task.headline(metrics)
            row["headline"] = {"name": name, "value": value}
        rows.append(row)
    return rows
