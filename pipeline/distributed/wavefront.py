"""The capture pass as a layer-major wavefront, data-parallel over groups of samples.

Each worker owns a group of calibration samples and walks the decoder one layer at a time:
stream ``i`` (the inputs of layer ``i`` for its samples) -> layer ``i`` -> stream ``i + 1``.
Only the model's head and one decoder layer are ever resident, so a worker's memory is one
layer plus one chunk of activations whatever the model size (a 72B model fits any GPU), the
activation store fills and drains layer by layer (its byte budget can bite), a layer's stream is
complete as soon as every group has passed it (search can start at once), and a lost worker
costs one layer of one group.

MBQ's gradient pass walks back the same way: the answer loss on the last stream, then for
``i = L-1 .. 0`` recompute layer ``i`` from stream ``i`` and backpropagate the gradient that came
from above (activations recomputed, never all kept).

Every call is idempotent: a layer whose output stream is already complete is skipped, which is
what ``--resume`` and Ray's retries rely on. Each step runs as its own Ray task (``wavefront_step``)
chained on the previous step of its group, so steps land on warm pooled workers, any step can
be retried alone, and groups on different GPUs never wait for each other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .context import JobContext, worker_device, worker_peak

MASK_KEYS = ("vision_mask", "answer_mask")


def group_root(store_root: str, group: int) -> str:
    return f"{store_root.rstrip('/')}/g{group:02d}"


def needs_last_stream(method: str) -> bool:
    """The output of the last layer is only needed for MBQ's loss."""
    return method in ("mbq", "qvlm+mbq")


class WavefrontWorker:
    def __init__(self, ctx: JobContext, group: int, n_groups: int, table_path: str, rows: list[int]):
        from ..data.store import ActivationStore
        from ..models import ADAPTERS
        from .models import job_source

        self.ctx, self.group, self.table_path, self.rows = ctx, group, table_path, rows
        self.device = worker_device()
        self.dtype = ctx.torch_compute_dtype
        self.adapter = ADAPTERS[ctx.family]
        self.source = job_source(ctx)
        budget = ctx.store_max_bytes // n_groups if ctx.store_max_bytes else None
        self.store = ActivationStore(group_root(ctx.store_root, group), max_bytes=budget)
        self.n_layers = _num_layers(self.source.config_dict, self.adapter)
        self._meta: dict[int, dict[str, Any]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _meta_of(self, sid: int) -> dict[str, Any]:
        if sid not in self._meta:
            meta = self.store.get_meta(sid)
            self._meta[sid] = {k: _to(v, self.device) for k, v in meta.items()}
        return self._meta[sid]

    def _layer_kwargs(self, sid: int) -> dict[str, Any]:
        return {k: v for k, v in self._meta_of(sid).items() if k not in MASK_KEYS}

    # -- forward ---------------------------------------------------------------------------

    def embed(self) -> dict[str, Any]:
        """Stream 0 and the per-sample metadata (layer kwargs, modality masks)."""
        from ..data.collate import load_table, row_masks, row_to_model_inputs
        from ..evaluate.streamed import build_head, embed, to_device

        if self.store.is_complete(0):
            return {"group": self.group, "layer": -1, "skipped": True}
        t0 = time.perf_counter()
        head = build_head(self.source, self.adapter, self.dtype, self.device)
        table = load_table(self.table_path)
        tokens = 0
        with self.store.writer(0) as w:
            for r in self.rows:
                sid = int(table.column("sample_id")[r].as_py())
                h, kwargs = embed(head, self.adapter, to_device(row_to_model_inputs(table, r), self.device, self.dtype))
                self.store.put_meta(sid, {**{k: _to(v, "cpu") for k, v in kwargs.items()}, **row_masks(table, r)})
                w.append(sid, h.to("cpu"))
                tokens += h.shape[0]
        return {"group": self.group, "layer": -1, "tokens": tokens, "seconds": time.perf_counter() - t0}

    def _entropy_acc(self) -> Any:
        """Q-VLM: an accumulator for this layer's input entropy and its dependency on the next."""
        if not self.ctx.options.get("entropy"):  # set by the driver while the partition is unknown
            return None
        from ..quant.entropy import EntropyAccumulator

        abits = self.ctx.recipe.abits
        return EntropyAccumulator(bits=abits if abits < 16 else 8)

    def _rows(self, layer: int):
        for chunk in self.store.iter_layer(layer):
            yield from chunk

    @torch.no_grad()
    def forward(self, i: int) -> dict[str, Any]:
        """Stream ``i`` through layer ``i`` into stream ``i + 1`` (Q-VLM: counting entropy on the way)."""
        from ..models.loading import build_layers
        from ..quant.types import layer_forward

        acc = self._entropy_acc()
        last = i == self.n_layers - 1
        no_output = last and not needs_last_stream(self.ctx.recipe.method)
        done = self.store.is_complete(i + 1)
        if no_output or done:
            if acc is not None:  # the streams alone give the counts: no layer needed
                nxt = self._rows(i + 1) if done else None
                for sid, h in self._rows(i):
                    h_next = next(nxt)[1] if nxt is not None else None
                    acc.update(h.to(self.device), None if h_next is None else h_next.to(self.device))
            return {"group": self.group, "layer": i, "skipped": True,
                    **({"entropy": acc.to_dict()} if acc is not None else {})}
        t0 = time.perf_counter()
        (layer,) = build_layers(self.source, self.adapter, [i], dtype=self.dtype, device=self.device)
        t1 = time.perf_counter()
        with self.store.writer(i + 1) as w:
            for sid, h in self._rows(i):
                h = h.to(self.device)
                out = layer_forward(layer, h, self._layer_kwargs(sid))
                if acc is not None:
                    acc.update(h, out)
                w.append(sid, out.to("cpu"))
        del layer
        return {"group": self.group, "layer": i, "load_s": t1 - t0, "seconds": time.perf_counter() - t0,
                "device": str(self.device), **worker_peak(),
                **({"entropy": acc.to_dict()} if acc is not None else {})}

    # -- MBQ gradient pass -----------------------------------------------------------------

    def _grad_home(self) -> torch.device:
        """Where the gradients flowing back between layers wait: on the GPU when all of this group's
        fit in a quarter of its free memory (they are one stream's size: 0.3 GB for 7B at 128
        samples), else on the host. On the GPU they skip a device-host round trip per sample and
        layer (two copies and a sync each)."""
        if self.device.type != "cuda":
            return torch.device("cpu")
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if self.store.layer_bytes(self.n_layers) < free // 4 else torch.device("cpu")

    def backward(self) -> dict[str, Any]:
        """Per-layer |dL/dY| statistics at o_proj / down_proj outputs for this group."""
        from ..data.collate import load_table, row_labels
        from ..evaluate.streamed import build_head
        from ..models.loading import build_layers
        from ..quant.sensitivity import HeadLoss, merge_stats, range_sensitivity, stats_to_floats

        t0 = time.perf_counter()
        table = load_table(self.table_path)
        labels = {int(table.column("sample_id")[r].as_py()): row_labels(table, r) for r in self.rows}
        head = build_head(self.source, self.adapter, self.dtype, self.device)
        norm = head.get_submodule(self.adapter.final_norm_path)
        lm_head = head.get_submodule(self.adapter.lm_head_path)
        grads: dict[int, torch.Tensor] = {}
        home = self._grad_home()
        for chunk in self.store.iter_layer(self.n_layers):
            for sid, h in chunk:
                h = h.to(self.device).unsqueeze(0).requires_grad_(True)
                with torch.enable_grad():
                    loss = HeadLoss(norm, lm_head, labels[sid].to(self.device))(h)
                    (g,) = torch.autograd.grad(loss, h)
                grads[sid] = g[0].to(home)
        del head, norm, lm_head
        stats: dict = {}
        for i in reversed(range(self.n_layers)):
            (layer,) = build_layers(self.source, self.adapter, [i], dtype=self.dtype, device=self.device)
            layer_stats: dict = {}
            for chunk in self.store.iter_layer(i):
                for sid, h in chunk:
                    meta = self._meta_of(sid)
                    g_in, st = range_sensitivity([layer], [i], h.to(self.device), self._layer_kwargs(sid),
                                                 meta["vision_mask"], meta["answer_mask"],
                                                 grad_out=grads[sid].to(self.device))
                    grads[sid] = g_in.to(home)
                    layer_stats = merge_stats(layer_stats, st, lazy=True)
            stats = merge_stats(stats, stats_to_floats(layer_stats))  # one host sync per layer
            del layer
        return {"group": self.group, "stats": stats, "seconds": time.perf_counter() - t0, **worker_peak()}


def _num_layers(config: dict[str, Any], adapter: Any) -> int:
    text = config.get(adapter.text_config_attr) or config
    return int(text["num_hidden_layers"])


def _to(v: Any, device: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(t, device) for t in v)
    return v


def save_json(path: Path, obj: Any) -> None:
    """Small atomic JSON write for job state (sensitivity, partition) that ``--resume`` reuses."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def wavefront_step(ctx: JobContext, group: int, n_groups: int, table_path: str, rows: list[int],
                   step: str, layer: int = -1, _after: Any = None) -> dict[str, Any]:
    """One step of one group as a Ray task: ``embed``, ``forward`` (layer) or ``backward``.
    ``_after`` is the previous step's result: passing its ObjectRef orders the chain."""
    w = WavefrontWorker(ctx, group, n_groups, table_path, rows)
    if step == "embed":
        return w.embed()
    if step == "forward":
        return w.forward(layer)
    if step == "backward":
        return w.backward()
    raise ValueError(step)
