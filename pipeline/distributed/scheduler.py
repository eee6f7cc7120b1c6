"""The driver's event loop for capture + search: which Ray work to start, when, and where.

- Capture: one chain of ``wavefront_step`` tasks per group of samples (one group per GPU; one on
  CPUs), walking the decoder layer by layer. A layer's stream is complete when every group
  passed it.
- Search: a block becomes a Ray task the moment its input stream is complete and its method has
  what it needs (MBQ: the sensitivity ratios of every layer; Q-VLM: the partition). For AWQ and
  SmoothQuant that means search overlaps capture.
- Streams are deleted as soon as nothing needs them (the capture has moved past, the block that
  reads them is done, the gradient pass is over), so the store holds a moving window.
- Lost workers: every step and every search is a Ray task, retried on another worker; the
  steps are idempotent, so a retry redoes at most one layer of one group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..data.store import ActivationStore
from .context import JobContext
from .faults import maybe_kill_driver
from .progress import JobView
from .runtime import RayContext
from .wavefront import group_root, needs_last_stream, wavefront_step

MAX_RETRIES = 3


@dataclass(frozen=True)
class GpuLayout:
    """How work shares a GPU: ``capture_groups`` capture workers plus one search while capture
    lasts, ``floor(1 / search_share)`` searches after. Shares are fractions of a GPU for Ray."""

    capture_groups: int
    capture_share: float
    search_share: float


# Three workers per GPU where they fit (capture is host-bound: a second group overlaps its store I/O
# with the first's); two (one capture group) on GPUs too small for three (job check decides).
# Each capture share is over 1 / (groups + 1), so Ray cannot pack an extra group onto a GPU.
GPU_LAYOUTS = {3: GpuLayout(capture_groups=2, capture_share=0.34, search_share=0.32),
               2: GpuLayout(capture_groups=1, capture_share=0.51, search_share=0.49)}


def placement(ray_ctx: RayContext, share: float) -> dict[str, Any]:
    """A fraction ``share`` of a GPU (a ``GpuLayout``'s), or one core on CPUs.

    Ray packs fractional requests onto the first GPU with room, so with shares that let one group
    too many fit (0.5 / 0.5 with one group per GPU) a 2-GPU job's capture piled onto GPU 0 (and
    its gradient passes too) while GPU 1 waited: hence shares just over 1 / (groups + 1).

    ``max_calls=0`` keeps GPU workers alive between tasks: Ray's default for GPU tasks is one task
    per process, which made every capture step and search pay a fresh interpreter, imports, CUDA
    context and meta model (~25 s each; measured on the H100, 7B: 30 s per layer instead of 1 s).
    A kept worker may be handed another GPU by its next task: ``worker_device`` follows it."""
    return {"num_gpus": share, "max_calls": 0} if ray_ctx.num_gpus else {"num_cpus": 1}


def capture_groups(ray_ctx: RayContext, n_rows: int, layout: GpuLayout = GPU_LAYOUTS[3]) -> int:
    """Sample groups walking the decoder side by side: the layout's groups per GPU, one on CPUs.
    A capture step is mostly host work (reading and writing the store, launching small kernels:
    ~0.1 s of a 7B layer's ~0.9 s was the forward on the H100), so a second group on a GPU
    overlaps its host work with the first's instead of leaving the GPU idle."""
    groups = ray_ctx.num_gpus * layout.capture_groups if ray_ctx.num_gpus else 1
    return max(1, min(groups, n_rows))  # never an empty group: readers iterate over every group's store


def split_rows(n_rows: int, n_groups: int) -> list[list[int]]:
    """Contiguous, near-equal groups of table rows."""
    n_groups = max(1, min(n_groups, n_rows))
    bounds = [round(k * n_rows / n_groups) for k in range(n_groups + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(n_groups)]


def capture_summary(stats: list[dict[str, Any]]) -> str:
    """One line on where capture time went (per-layer weight load vs forward, and on what device),
    so a slow capture shows its cause in the job log."""
    steps = [s for s in stats if s.get("layer", -1) >= 0 and "load_s" in s]
    if not steps:
        return "capture done (every layer already captured)"
    load = sum(s["load_s"] for s in steps)
    total = sum(s["seconds"] for s in steps)
    devices = sorted({s.get("device", "?") for s in steps})
    return (f"capture done: {len(steps)} layer steps, {total:.1f}s in workers ({load:.1f}s building layers, "
            f"{total - load:.1f}s forward + store) on {', '.join(devices)}")


STATUS_EVERY_S = 30.0  # a status line (phase, blocks, store bytes, ETA) in the job log this often


def phase_eta(done: int, total: int, elapsed: float, phase: str) -> str:
    """``"<phase> ETA 1m05s"`` at the pace so far (a linear estimate; empty before any progress)."""
    if done <= 0 or total <= done or elapsed <= 0:
        return ""
    left = round(elapsed / done * (total - done))
    return f"{phase} ETA {left // 60}m{left % 60:02d}s" if left >= 60 else f"{phase} ETA {left}s"


def peak_gpu_by_worker(records: list[dict[str, Any]]) -> dict[int, int]:
    """Peak GPU bytes of each worker process (keyed by pid) over the records it returned."""
    peaks: dict[int, int] = {}
    for r in records:
        if "peak_gpu_bytes" in r:
            peaks[r["pid"]] = max(peaks.get(r["pid"], 0), r["peak_gpu_bytes"])
    return peaks


def _results(refs: list) -> list[dict[str, Any]]:
    """The results of best-effort tasks (a failed warm-up costs nothing but its warmth)."""
    import ray

    out = []
    for r in refs:
        try:
            out.append(ray.get(r, timeout=60))
        except Exception:
            pass
    return out


class CaptureAndSearch:
    """One job's capture and search. ``blocks_for(capture_result)`` gives the blocks once the
    method has what it needs; for overlap methods it is known up front (``early_blocks``)."""

    def __init__(self, ctx: JobContext, ray_ctx: RayContext, table_path: str, n_rows: int, n_layers: int,
                 view: JobView, done_blocks: set[int], search_fn: Callable):
        self.ctx, self.ray_ctx, self.view = ctx, ray_ctx, view
        self.table_path, self.n_layers = table_path, n_layers
        self.layout = GPU_LAYOUTS[ctx.options.get("workers_per_gpu", 3)]
        self.groups = split_rows(n_rows, ctx.options.get("groups", 1))
        self.done_blocks = set(done_blocks)
        self.search_fn = search_fn
        self.method = ctx.recipe.method
        self.stores = [ActivationStore(group_root(ctx.store_root, g)) for g in range(len(self.groups))]
        self.summaries: list[dict[str, Any]] = []
        self.capture_stats: list[dict[str, Any]] = []
        self.events: dict[str, float] = {}  # seconds since run() began: the phase boundaries
        self.peak_store_bytes = 0
        self.warm_stats: list[dict[str, Any]] = []

    # -- streams --------------------------------------------------------------------------

    def stream_complete(self, layer: int) -> bool:
        return all(s.is_complete(layer) for s in self.stores)

    def store_bytes(self) -> int:
        return sum(s.bytes_used() for s in self.stores)

    def _delete_unneeded(self, passed: set[int], blocks: list[list[int]] | None, backward_done: bool) -> None:
        """A stream may go once the wavefront has passed it, no unfinished block starts there,
        and the gradient pass (if any) no longer needs it."""
        if needs_last_stream(self.method) and not backward_done:
            return
        if blocks is None:  # partition unknown yet: every stream may start a block
            return
        pending_firsts = {b[0] for k, b in enumerate(blocks) if k not in self.done_blocks}
        for layer in sorted(passed):
            if layer not in pending_firsts:
                for s in self.stores:
                    s.delete(layer)
                passed.discard(layer)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, early_blocks: list[list[int]] | None,
            after_capture: Callable[[list[dict[str, Any]]], tuple[list[list[int]], dict | None]],
            capture: bool = True, known_sensitivity: bool = False) -> list[dict]:
        """Capture (unless the method needs none), search every block, return block summaries.

        ``early_blocks``: the blocks when known before capture (then search overlaps capture);
        ``after_capture(stats) -> (blocks, sensitivity)`` runs once capture (and MBQ's gradient
        pass) is over.
        """
        import ray

        ctx, n_layers = self.ctx, self.n_layers
        calls: dict[Any, tuple[int, int]] = {}  # ref -> (group, layer); layer -1 = embed
        n_groups = len(self.groups) if capture else 0
        capture_slot = placement(self.ray_ctx, self.layout.capture_share)
        step = ray.remote(max_retries=MAX_RETRIES, **capture_slot)(wavefront_step)
        last_ref: dict[int, Any] = {}
        for g, rows in enumerate(self.groups[:n_groups]):
            prev = step.remote(ctx, g, n_groups, self.table_path, rows, "embed")
            calls[prev] = (g, -1)
            for i in range(n_layers):
                prev = step.remote(ctx, g, n_groups, self.table_path, rows, "forward", i, prev)
                calls[prev] = (g, i)
            last_ref[g] = prev
        warm = self._warm_search_workers(n_groups, early_blocks is None or (capture and needs_last_stream(self.method)))
        left = {i: n_groups for i in range(-1, n_layers)}  # capture calls left per layer
        n_calls, resumed = len(calls), len(self.done_blocks)
        at = [-1] * n_groups  # the layer each group has passed: the live view's per-group position
        search_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False,
                                 **placement(self.ray_ctx, self.layout.search_share))(self.search_fn)
        st = {"blocks": early_blocks, "sensitivity": None, "phase_done": False}
        running: dict[Any, int] = {}
        submitted: set[int] = set()
        passed: set[int] = set()  # streams every group has moved past
        backward_refs: list = []
        need_backward = capture and needs_last_stream(self.method) and not known_sensitivity
        t0 = last_note = time.perf_counter()

        def submit_ready() -> None:
            blocks = st["blocks"]
            if blocks is None or (need_backward and not st["phase_done"]):
                return
            for b, ids in enumerate(blocks):
                if b in self.done_blocks or b in submitted:
                    continue
                if not capture or self.stream_complete(ids[0]):
                    sens = st["sensitivity"]
                    running[search_task.remote(ctx, b, ids, {i: sens[i] for i in ids} if sens else None)] = b
                    submitted.add(b)
                    self.events.setdefault("search start", time.perf_counter() - t0)

        with self.view.task("capture (group x layer)", total=max(1, len(calls))) as cap_adv, \
                self.view.task("search (blocks)", total=len(early_blocks or []) or n_layers) as srch_adv:
            if self.done_blocks:
                srch_adv(len(self.done_blocks), note="resumed")
            submit_ready()
            while True:
                if not calls and need_backward and not backward_refs and not st["phase_done"] \
                        and not self.capture_stats_has_backward():
                    self.view.info("gradient pass (MBQ sensitivity), layer by layer in reverse")
                    backward_refs = [step.remote(ctx, g, n_groups, self.table_path, rows, "backward", -1, last_ref[g])
                                     for g, rows in enumerate(self.groups[:n_groups])]
                if not calls and not backward_refs and not st["phase_done"]:
                    st["blocks"], st["sensitivity"] = after_capture(self.capture_stats)
                    st["phase_done"] = True
                    srch_adv(0, total=len(st["blocks"]))
                    submit_ready()
                if st["phase_done"] and not running and len(self.done_blocks) >= len(st["blocks"]):
                    break
                pending = list(calls) + backward_refs + list(running)
                ready, _ = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in calls:
                        g, i = calls.pop(ref)
                        self.capture_stats.append(ray.get(ref))
                        self.peak_store_bytes = max(self.peak_store_bytes, self.store_bytes())
                        left[i] -= 1
                        at[g] = max(at[g], i + 1)
                        cap_adv(1, note="groups at layer " + ",".join(map(str, at)) + f" of {n_layers}")
                        if left[i] == 0:
                            if i >= 0:
                                passed.add(i)
                            submit_ready()
                        if not calls:
                            self.events["capture end"] = time.perf_counter() - t0
                            self.view.info(capture_summary(self.capture_stats))
                    elif ref in backward_refs:
                        backward_refs.remove(ref)
                        self.capture_stats.append(ray.get(ref))
                        if not backward_refs:
                            self.events["gradient pass end"] = time.perf_counter() - t0
                            self.view.info(f"gradient pass done at {self.events['gradient pass end']:.1f}s")
                    else:
                        b = running.pop(ref)
                        summary = ray.get(ref)
                        self.summaries.append(summary)
                        self.done_blocks.add(b)
                        srch_adv(1, note=f"block {b} ({summary.get('search_s', 0):.1f}s)")
                        maybe_kill_driver(ctx.options.get("fault"), len(self.done_blocks))
                if capture:
                    self._delete_unneeded(passed, st["blocks"], not need_backward or st["phase_done"])
                now = time.perf_counter()
                if now - last_note > STATUS_EVERY_S:
                    last_note = now
                    blocks = st["blocks"]
                    cap = (f"capture groups at layer {','.join(map(str, at))} of {n_layers}, " if calls else "")
                    if calls:  # the capture's ETA from its own pace
                        eta = phase_eta(n_calls - len(calls), n_calls, now - t0, "capture")
                    elif "search start" in self.events and blocks:
                        eta = phase_eta(len(self.summaries), len(blocks) - resumed, now - t0 - self.events["search start"],
                                        "search")
                    else:
                        eta = "gradient pass running" if backward_refs else ""
                    self.view.info(f"status: {cap}{len(self.done_blocks)}/{len(blocks) if blocks else '?'} blocks "
                                   f"done, {len(running)} running, store {self.store_bytes() / 2**30:.2f} GiB, "
                                   f"{now - t0:.0f}s" + (f", {eta}" if eta else ""))
        self.events["search end"] = time.perf_counter() - t0
        self.warm_stats = _results(warm)
        if "search start" in self.events:
            self.view.info(f"search: {len(self.summaries)} blocks in "
                           f"{self.events['search end'] - self.events['search start']:.1f}s (first submitted to last done)")
        if capture:
            self._delete_unneeded(passed | set(range(n_layers + 1)), st["blocks"], True)
        self.blocks = st["blocks"]
        self.sensitivity = st["sensitivity"]
        return sorted(self.summaries, key=lambda x: x["block"])

    def _warm_search_workers(self, n_groups: int, searches_wait: bool) -> list:
        """When no search can start before capture ends (MBQ, Q-VLM's entropy partition), warm one
        search worker per slot that capture leaves free, so the search phase starts on workers that
        have imported, opened CUDA and built the meta model (a cold one spends seconds on that,
        which is the same in a 1- and a 2-GPU run and so caps the search phase's scaling)."""
        import ray

        from .search import warm_worker

        if not n_groups or not searches_wait or self.ctx.options.get("warm_workers") is False:
            return []
        if self.ray_ctx.num_gpus:
            free = self.ray_ctx.num_gpus  # one search share beside each GPU's capture groups
        else:
            free = max(0, min(self.ray_ctx.num_cpus - n_groups, self.n_layers))
        task = ray.remote(max_retries=0, **placement(self.ray_ctx, self.layout.search_share))(warm_worker)
        return [task.remote(self.ctx) for _ in range(free)]

    def capture_stats_has_backward(self) -> bool:
        return any("stats" in s for s in self.capture_stats)
