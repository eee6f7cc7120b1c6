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


# How this process's CUDA runtime numbers the GPUs, fixed at its first CUDA use (see worker_device).
_UNSET = object()
_cuda_view: Any = _UNSET  # list of node GPU ids, None (all GPUs), or _UNSET
_last_index: int | None = None


def ray_gpu_assignment() -> tuple[list[str], list[str] | None] | None:
    """Inside a Ray task that holds GPUs: (its GPU ids, the node's GPU list the worker started with,
    None meaning every GPU). Outside Ray, or without a GPU, None."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        rctx = ray.get_runtime_context()
        if rctx.worker.mode != ray.WORKER_MODE:
            return None
        ids = [str(i) for i in rctx.get_accelerator_ids().get("GPU", [])]
        original = getattr(ray._private.worker.global_worker, "original_visible_accelerator_ids", {}).get("GPU")
    except Exception:  # an older/newer Ray without these: fall back to Ray's per-task variable
        return None
    if not ids:
        return None
    return ids, None if original is None else [str(x) for x in original]


def open_cuda_view(original: list[str] | None, env: dict[str, str]) -> list[str] | None:
    """Before this process first touches CUDA: make every GPU of the node visible (in Ray's
    numbering), instead of the one GPU Ray named for the first task. Returns the view."""
    if original is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)  # index i is then the GPU that CUDA_VISIBLE_DEVICES=i names
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(original)
    return original


def cuda_index(gpu_id: str, view: list[str] | None) -> int:
    """The torch device index of Ray's GPU ``gpu_id`` in a process that sees ``view``."""
    if view is None:
        return int(gpu_id)
    if gpu_id not in view:
        raise RuntimeError(f"Ray assigned GPU {gpu_id}, which this worker cannot see (it sees {view})")
    return view.index(gpu_id)


def worker_device() -> torch.device:
    """The GPU Ray assigned to this task, else the CPU.

    Workers live across tasks (``max_calls=0``), but a CUDA runtime reads CUDA_VISIBLE_DEVICES
    once: a worker that first ran on GPU 0 and is later handed GPU 1 would keep computing on GPU 0,
    piling two GPUs' work onto one. So the first call opens the node's whole GPU list to the
    process, and every call selects the task's GPU by index (and releases the cache held on the
    GPU a previous task used). It also keeps attention off cuDNN (``shape_stable_attention``)."""
    global _cuda_view, _last_index
    from ..models.loading import shape_stable_attention

    shape_stable_attention()
    assignment = ray_gpu_assignment()
    if assignment is not None and _cuda_view is _UNSET and not torch.cuda.is_initialized():
        _cuda_view = open_cuda_view(assignment[1], os.environ)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if assignment is None or _cuda_view is _UNSET:
        return torch.device("cuda", 0)  # outside Ray, or CUDA was opened before us with Ray's one GPU
    index = cuda_index(assignment[0][0], _cuda_view)
    if _last_index is not None and index != _last_index:
        torch.cuda.empty_cache()  # the previous GPU's cached blocks belong to another worker's budget now
    _last_index = index
    torch.cuda.set_device(index)  # Triton launches and peak-memory queries follow the current device
    return torch.device("cuda", index)


def worker_peak() -> dict[str, int]:
    """This worker process's peak GPU memory so far on its current GPU (workers live across tasks,
    so this is the per-actor peak the planner promises to bound), plus the process id (on CPU
    too: which process ran what shows whether searches found warm workers)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"pid": os.getpid()}
    return {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated()), "pid": os.getpid(),
            "gpu": torch.cuda.current_device()}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]
