"""The capture pass: fp forward of every calibration sample, each layer's input to the store.

One worker holds the model here; the scale-out work replaces it with pipeline-parallel shard
workers behind the same ``begin / capture_batch / finish`` calls.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..quant.capture import record_layer_inputs
from .context import JobContext, worker_device


class CaptureWorker:
    """Holds the fp model on one device and streams layer inputs into the activation store."""

    def __init__(self, ctx: JobContext):
        from ..data.store import ActivationStore
        from ..models import ADAPTERS
        from ..models.loading import build_model
        from .models import open_model_source

        self.ctx = ctx
        self.device = worker_device()
        self.adapter = ADAPTERS[ctx.family]
        source = open_model_source(ctx.model, ctx.allow_pickle)
        self.model = build_model(source, self.adapter, dtype=ctx.torch_compute_dtype, device=self.device)
        self.layers = self.model.get_submodule(self.adapter.layers_path)
        self.store = ActivationStore(ctx.store_root, max_bytes=ctx.store_max_bytes)
        self.writers: dict[int, Any] = {}
        self.stats: dict[str, Any] = {"samples": 0, "tokens": 0, "seconds": 0.0}
        # MBQ: the gradient pass runs on the same worker, one sample at a time
        self.want_sensitivity = ctx.recipe.method in ("mbq", "qvlm+mbq")
        self.sensitivity: dict = {}

    def begin(self) -> int:
        self.writers = {i: self.store.writer(i) for i in range(len(self.layers))}
        return len(self.layers)

    def capture_batch(self, table_path: str, rows: list[int]) -> dict[str, Any]:
        from ..data.collate import load_table, row_labels, row_masks, row_to_model_inputs
        from ..quant.sensitivity import merge_stats, model_sensitivity

        t0 = time.perf_counter()
        table = load_table(table_path)
        for r in rows:
            sid = int(table.column("sample_id")[r].as_py())
            inputs = _to_device(row_to_model_inputs(table, r), self.device, self.ctx.torch_compute_dtype)
            masks = row_masks(table, r)

            def on_input(i: int, hidden: torch.Tensor) -> None:
                self.writers[i].append(sid, hidden.to("cpu"))

            kwargs = record_layer_inputs(self.model, self.layers, inputs, on_input)
            meta = {k: _cpu(v) for k, v in kwargs.items()}
            meta.update(masks)
            self.store.put_meta(sid, meta)
            if self.want_sensitivity:
                labels = row_labels(table, r).to(self.device)
                st = model_sensitivity(self.model, self.layers, inputs, labels,
                                       masks["vision_mask"].to(self.device), masks["answer_mask"].to(self.device))
                self.sensitivity = merge_stats(self.sensitivity, st)
            self.stats["samples"] += 1
            self.stats["tokens"] += int(masks["vision_mask"].numel())
        self.stats["seconds"] += time.perf_counter() - t0
        return dict(self.stats)

    def finish(self) -> dict[str, Any]:
        for w in self.writers.values():
            w.close()
        self.writers = {}
        return {**self.stats, "sensitivity_stats": self.sensitivity or None}


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to("cpu")
    if isinstance(v, tuple):
        return tuple(_cpu(t) for t in v)
    return v


def _to_device(inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out
