"""The evaluation fleet: work items (checkpoint x task x shard) pulled by Ray actors.

One ``EvalWorker`` actor per GPU (per CPU without one; fractional shares when more workers than
devices are asked for). The driver hands an idle worker its next item, preferring one for the
checkpoint the worker already holds (its ``ModelCache``), then a checkpoint no other worker is
on, then anything left. Each result is stored the moment it arrives (``ItemStore``), so a
re-run only does what is missing. A checkpoint that fails to load fails its remaining items at
once with the same error; every other checkpoint goes on. A worker that dies fails its item and
is replaced. No numerics here: workers call ``evaluate.tasks.items.run_item``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..evaluate.tasks.items import ItemStore, WorkItem, run_item
from .progress import JobView

MAX_WORKER_DEATHS = 3  # per worker slot, before the fleet gives up on the remaining items


class EvalWorker:
    """Ray actor body: runs items with a cache of loaded checkpoints, and counts what it ran."""

    def __init__(self, index: int):
        from ..evaluate.tasks.checkpoints import ModelCache

        self.index = index
        self.cache = ModelCache(capacity=2)
        self.executed: list[str] = []

    def run(self, item: WorkItem) -> dict[str, Any]:
        self.executed.append(item.id)
        result = run_item(item, self.cache)
        result["worker"] = self.index
        return result

    def stats(self) -> dict[str, Any]:
        return {"worker": self.index, "executed": list(self.executed), "loads": self.cache.loads}


@dataclass
class FleetStats:
    total: int
    resumed: int  # items whose stored result was kept
    executed: int = 0  # items run by workers in this call
    failed_fast: int = 0  # items not run because their checkpoint failed to load
    workers: int = 0
    loads: int = 0  # checkpoint loads over all workers
    per_worker: list[dict[str, Any]] = field(default_factory=list)
    worker_deaths: int = 0


def pick_item(pending: Sequence[WorkItem], holding: str | None, busy: dict[str, int]) -> int:
    """Index in ``pending`` of the next item for a worker holding checkpoint ``holding``:
    same checkpoint first, then one no busy worker is on, then the first. ``busy``: checkpoint
    path -> workers on it now."""
    for i, it in enumerate(pending):
        if it.ckpt.path == holding:
            return i
    for i, it in enumerate(pending):
        if not busy.get(it.ckpt.path):
            return i
    return 0


def _resources(ray_ctx: Any, n_workers: int) -> dict[str, float]:
    if ray_ctx.num_gpus:
        return {"num_gpus": min(1.0, ray_ctx.num_gpus / n_workers)}
    return {"num_cpus": min(1.0, max(ray_ctx.num_cpus, 1) / n_workers)}


def run_fleet(items: list[WorkItem], store: ItemStore, *, address: str | None = None,
              workers: int | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
              view: JobView | None = None) -> FleetStats:
    """Run every item that has no stored ``ok`` result; results go to ``store`` as they arrive."""
    view = view or JobView()
    done = store.done(items)
    pending = [it for it in items if it.id not in done]
    stats = FleetStats(total=len(items), resumed=len(done))
    if done:
        view.info(f"resume: {len(done)} of {len(items)} work items already done")
    if not pending:
        return stats
    import ray

    from ..config import Resources
    from .runtime import init_ray, shutdown_ray

    ray_ctx = init_ray(Resources(address=address, num_cpus=num_cpus, num_gpus=num_gpus))
    try:
        n = max(1, min(len(pending), workers or (ray_ctx.num_gpus or max(1, ray_ctx.num_cpus))))
        stats.workers = n
        actor_cls = ray.remote(**_resources(ray_ctx, n))(EvalWorker)
        view.info(f"{n} eval worker(s) on {'GPU' if ray_ctx.num_gpus else 'CPU'}; {len(pending)} work items "
                  f"({len({it.ckpt.path for it in items})} checkpoints x {len({it.task.key for it in items})} tasks)")
        _loop(ray, actor_cls, n, pending, store, stats, view)
    finally:
        shutdown_ray(ray_ctx)
    return stats


def _loop(ray: Any, actor_cls: Any, n: int, pending: list[WorkItem], store: ItemStore, stats: FleetStats,
          view: JobView) -> None:
    actors = {k: actor_cls.remote(k) for k in range(n)}
    holding: dict[int, str | None] = {k: None for k in range(n)}
    running: dict[Any, tuple[int, WorkItem]] = {}
    busy: dict[str, int] = {}
    deaths = 0
    broken: dict[str, str] = {}  # checkpoint path -> load error

    with view.task("eval (checkpoint x task x shard)", total=stats.total) as advance:
        if stats.resumed:
            advance(stats.resumed, note="resumed")

        def dispatch(k: int) -> None:
            while pending:
                it = pending.pop(pick_item(pending, holding[k], busy))
                if it.ckpt.path in broken:  # its checkpoint already failed to load: fail fast
                    _fail_fast(it, broken[it.ckpt.path], store, stats, advance)
                    continue
                holding[k] = it.ckpt.path
                busy[it.ckpt.path] = busy.get(it.ckpt.path, 0) + 1
                running[actors[k].run.remote(it)] = (k, it)
                return

        for k in range(n):
            dispatch(k)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            k, it = running.pop(ref)
            busy[it.ckpt.path] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the worker died (OOM, segfault): replace it
                deaths += 1
                stats.worker_deaths += 1
                result = {"id": it.id, "checkpoint": it.ckpt.name, "task": it.task.name, "shard": it.shard,
                          "status": "error", "stage": "worker", "error": f"eval worker died: {str(e)[:300]}"}
                if deaths > MAX_WORKER_DEATHS * n:
                    store.save(result)
                    raise RuntimeError(f"{deaths} eval workers died; last error: {result['error']}") from None
                actors[k] = actor_cls.remote(k)
                holding[k] = None
            store.save(result)
            stats.executed += 1
            if result.get("status") != "ok" and result.get("stage") == "load":
                broken[it.ckpt.path] = result["error"]
                view.info(f"[red]{it.ckpt.name}: {result['error']}[/red]")
            note = f"{it.describe()} {result.get('status')} ({result.get('seconds', 0):.1f}s)"
            advance(1, note=note)
            dispatch(k)
        for k, a in actors.items():
            try:
                s = ray.get(a.stats.remote())
                stats.per_worker.append(s)
                stats.loads += s["loads"]
            except ray.exceptions.RayActorError:
                pass
            ray.kill(a)


def _fail_fast(it: WorkItem, error: str, store: ItemStore, stats: FleetStats, advance: Any) -> None:
    store.save({"id": it.id, "checkpoint": it.ckpt.name, "task": it.task.name, "shard": it.shard,
                "n_shards": it.n_shards, "start": it.start, "stop": it.stop, "status": "error",
                "stage": "load", "error": error, "not_run": True})
    stats.failed_fast += 1
    advance(1, note=f"{it.describe()} skipped (checkpoint failed to load)")
