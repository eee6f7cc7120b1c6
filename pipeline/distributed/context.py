"""What every Ray worker of one job needs to know, as a small picklable value.

Workers open the model themselves from ``model`` (a folder, ``builtin`` resolved to a folder, or
``synthetic:NAME``), so nothing large ever travels through the object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from typing import Any

import torch

from ..config import QuantRecipe

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class JobContext:
    model: str  # resolved model reference (folder path or synthetic:NAME)
    family: str
    recipe: QuantRecipe
    work_dir: str
    store_root: str
    compute_dtype: str  # dtype of the fp model in capture/search
    storage_dtype: str  # dtype of scales and unquantized tensors in the checkpoint
    allow_pickle: bool = False
    store_max_bytes: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    @property
    def torch_storage_dtype(self) -> torch.dtype:
        return _DTYPES[self.storage_dtype]

    @property
    def parts_dir(self) -> str:
        return f"{self.work_dir}/parts"

    def part_path(self, block_id: int) -> str:
        return f"{self.parts_dir}/block_{block_id:04d}.safetensors"


def worker_device() -> torch.device:
    """The GPU Ray assigned to this worker, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES per worker
    return torch.device("cpu")


def worker_peak() -> dict[str, int]:
    """This worker process's peak GPU memory so far (workers live across tasks, so this is the
    per-actor peak the planner promises to bound), plus the GPU it ran on."""
    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated()), "pid": os.getpid()}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]
