"""A packed checkpoint read as a ``WeightSource``: quantized Linears read as their dequantized
weights, one tensor at a time. This is what lets the layer-streamed runner
(``pipeline.evaluate.streamed``) re-run a checkpoint of any size in one layer's worth of memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..models.weights import WeightSource
from ..quant.quantizer import QuantScheme
from .layout import SUFFIXES, decompress_weight, resolve_schemes, st_dtype
from .loader import _Shards, quantized_modules, read_config, weight_map


class CheckpointSource(WeightSource):
    """``device``: where packed codes are unpacked and dequantized (the GPU the layers run on: on
    the CPU, unpacking a 7B checkpoint's 6.5 B codes is most of a layer-streamed validation)."""

    def __init__(self, ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu"):
        self.model_dir = Path(ckpt_dir)
        self.device = torch.device(device)
        config = read_config(self.model_dir)
        self.qconfig = config.get("quantization_config") or {}
        self._config = {k: v for k, v in config.items() if k != "quantization_config"}
        self.wmap = weight_map(self.model_dir)
        modules = quantized_modules(self.wmap)
        self.schemes: dict[str, QuantScheme] = resolve_schemes(self.qconfig, modules) if modules else {}
        self._headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for shard in sorted(set(self.wmap.values())):
            with safe_open(str(self.model_dir / shard), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    self._headers[k] = (tuple(sl.get_shape()), st_dtype(sl.get_dtype()))
        self._keys: list[str] = []
        for k in self.wmap:
            mod, _, leaf = k.rpartition(".")
            if mod in self.schemes:
                if leaf == "weight_packed":
                    self._keys.append(f"{mod}.weight")
                elif leaf not in SUFFIXES:
                    self._keys.append(k)  # e.g. the bias of a quantized Linear
            else:
                self._keys.append(k)
        self._shards = _Shards(self.model_dir, self.wmap)

    @property
    def config_dict(self) -> dict[str, Any]:
        return self._config

    def keys(self) -> list[str]:
        return list(self._keys)

    def _quantized(self, name: str) -> str | None:
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        return mod if mod in self.schemes else None

    def shape(self, name: str) -> tuple[int, ...]:
        mod = self._quantized(name)
        if mod is not None:
            return tuple(int(x) for x in self._shards.get(f"{mod}.weight_shape").tolist())
        return self._headers[name][0]

    def dtype(self, name: str) -> torch.dtype:
        mod = self._quantized(name)
        if mod is not None:
            return self._headers[f"{mod}.weight_scale"][1]
        return self._headers[name][1]

    def get(self, name: str) -> torch.Tensor:
        mod = self._quantized(name)
        if mod is None:
            return self._shards.get(name)
        tensors = {s: self._shards.get(f"{mod}.{s}").to(self.device) for s in SUFFIXES if f"{mod}.{s}" in self.wmap}
        # exact (q - zero) * scale; the layer builder casts to the compute dtype, as the loader does
        return decompress_weight(tensors, self.schemes[mod]).dequantize(torch.float32)


def dequantized_bytes(ckpt_dir: str | os.PathLike) -> int:
    """Bytes of the dequantized model (what a whole-model reload would allocate, in the stored dtypes)."""
    src = CheckpointSource(ckpt_dir)
    return sum(src.nbytes(k) for k in src.keys())

