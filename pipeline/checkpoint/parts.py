"""Part files: the result of one searched block, one safetensors file, written atomically.

A search actor writes a part; the gather step streams parts into the checkpoint. Quantized
Linears are stored already in the on-disk layout (``<module>.weight_packed``, ...; see
``layout.py``), so gathering copies tensors instead of re-packing them. Replaced fp tensors
(folded norms, ...) are stored under their full parameter name. The safetensors metadata holds
the part format tag, each Linear's scheme, the replaced names and the block's metrics (JSON).

Atomicity: the file is written under a temporary name in the same directory, fsynced, then
renamed. A crashed writer leaves at most a ``.tmp`` file, which :func:`read_part` never opens
(and which the pipeline's manifest never names).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..quant.quantizer import QuantizedWeight, QuantScheme
from ..quant.types import BlockResult
from .layout import SUFFIXES, compress_weight, decompress_weight

PART_FORMAT = "vlmq-part/1"


@dataclass
class PartIndex:
    """What a part holds, read from its header alone (no tensor data)."""

    path: Path
    schemes: dict[str, QuantScheme]  # full module name -> scheme
    replaced: list[str]  # full parameter names
    metrics: dict[str, Any]


def _scheme_json(s: QuantScheme) -> dict[str, Any]:
    return {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` under a temp name, fsync, rename: the final name is all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_part(path: str | os.PathLike, result: BlockResult, full_name: Callable[[str], str]) -> Path:
    """Write one block's result. ``full_name`` maps ``"3.self_attn.q_proj"`` to the checkpoint name."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict[str, Any]] = {}
    for key, qw in result.quantized.items():
        module = full_name(key)
        for suffix, t in compress_weight(qw).items():
            tensors[f"{module}.{suffix}"] = t.detach().cpu()
        schemes[module] = _scheme_json(qw.scheme)
    replaced = []
    for key, t in result.replaced.items():
        name = full_name(key)
        if name in tensors:
            raise ValueError(f"replaced tensor {name} collides with a quantized tensor")
        tensors[name] = t.detach().cpu()
        replaced.append(name)
    metadata = {
        "format": "pt",
        "vlmq_part": PART_FORMAT,
        "schemes": json.dumps(schemes),
        "replaced": json.dumps(replaced),
        "metrics": json.dumps(result.metrics, default=_json_default),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path, tensors, metadata)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"metrics value of type {type(obj).__name__} is not JSON-able")


def read_part_index(path: str | os.PathLike) -> PartIndex:
    """Header only: which modules a part quantizes, which tensors it replaces, its metrics."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
    if meta.get("vlmq_part") != PART_FORMAT:
        raise ValueError(f"{path} is not a vlmq part file (format tag {meta.get('vlmq_part')!r})")
    schemes = {m: QuantScheme(**s) for m, s in json.loads(meta["schemes"]).items()}
    replaced = json.loads(meta["replaced"])
    for m, s in schemes.items():
        need = [x for x in SUFFIXES if x != "weight_zero_point" or not s.symmetric]
        missing = [f"{m}.{x}" for x in need if f"{m}.{x}" not in keys]
        if missing:
            raise ValueError(f"part {path} lacks {missing}")
    return PartIndex(path=path, schemes=schemes, replaced=replaced, metrics=json.loads(meta["metrics"]))


def read_part(
    path: str | os.PathLike,
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """(quantized by full module name, replaced by full parameter name, metrics)."""
    index = read_part_index(path)
    quantized: dict[str, QuantizedWeight] = {}
    with safe_open(str(index.path), framework="pt") as f:
        keys = set(f.keys())
        for module, scheme in index.schemes.items():
            tensors = {s: f.get_tensor(f"{module}.{s}") for s in SUFFIXES if f"{module}.{s}" in keys}
            quantized[module] = decompress_weight(tensors, scheme)
        replaced = {name: f.get_tensor(name) for name in index.replaced}
    return quantized, replaced, index.metrics


class PartModules(Mapping[str, QuantizedWeight]):
    """The quantized Linears of many part files by full module name, each read (and unpacked on
    ``device``) only when asked for: a streamed reference of a 72B model then holds one layer's
    weights, not the whole model's, and unpacking runs on the GPU instead of the CPU."""

    def __init__(self, paths: list[str], device: torch.device | str = "cpu"):
        self.device = str(device)
        self._where: dict[str, tuple[Path, QuantScheme]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        for p in paths:
            index = read_part_index(p)
            self._where.update({m: (index.path, s) for m, s in index.schemes.items()})
            if index.replaced:
                with safe_open(str(index.path), framework="pt") as f:
                    self.replaced.update({name: f.get_tensor(name) for name in index.replaced})

    def __getitem__(self, module: str) -> QuantizedWeight:
        path, scheme = self._where[module]
        with safe_open(str(path), framework="pt", device=self.device) as f:
            keys = set(f.keys())
            tensors = {s: f.get_tensor(f"{module}.{s}") for s in SUFFIXES if f"{module}.{s}" in keys}
        return decompress_weight(tensors, scheme)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
