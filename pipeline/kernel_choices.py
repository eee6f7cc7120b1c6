"""The kernel autotuner's decisions, kept on disk between processes.

``kernels.autotune`` times a few launches per (scheme, M bucket, N, K) on a shape's first call and
keeps the fastest for the process. Here those decisions go to one JSON file per (GPU, triton
version, kernels source) under ``$VLMQ_CACHE/kernels`` (default ``~/.cache/vlmq/kernels``), so the
next process starts with them: no tuning at start-up and the same launches every run. A change to
the GPU, triton or any file of ``kernels/`` names a fresh file, so new candidates are always tuned.
``VLMQ_KERNEL_CACHE=0`` turns the cache off; any other value is the folder to use.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
from pathlib import Path

import torch

_ENABLED: set[str] = set()


def _source_hash() -> str:
    import kernels

    root = Path(kernels.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def cache_file(device: torch.device | str) -> Path | None:
    """The file for ``device``'s GPU, or None when the cache is off or the device is not CUDA."""
    device = torch.device(device)
    setting = os.environ.get("VLMQ_KERNEL_CACHE", "")
    if device.type != "cuda" or setting.lower() in ("0", "off", "false", "no"):
        return None
    import triton

    from .distributed.models import cache_dir  # $VLMQ_CACHE or ~/.cache/vlmq (no Ray behind it)

    root = Path(setting) if setting else cache_dir() / "kernels"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    return root / f"{gpu}-triton{triton.__version__}-{_source_hash()}.json"


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or unreadable: start afresh (the file is only a cache)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def load(device: torch.device | str) -> int:
    """Hand the kept decisions for ``device`` to the autotuner; how many there were."""
    from kernels import autotune

    path = cache_file(device)
    if path is None:
        return 0
    kept = _read(path)
    autotune.preload(kept)
    return len(kept)


def save(device: torch.device | str) -> Path | None:
    """Add this process's decisions to the file (merged with what it holds now, written whole
    and renamed into place, so processes sharing it never leave it half-written)."""
    from kernels import autotune

    path = cache_file(device)
    mine = autotune.export()
    if path is None or not mine:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path), **mine}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home is no reason to fail a run
        return None
    return path


def enable(device: torch.device | str) -> None:
    """Load the kept decisions now and save this process's at exit (once per device)."""
    path = cache_file(device)
    if path is None or str(path) in _ENABLED:
        return
    _ENABLED.add(str(path))
    load(device)
    atexit.register(save, torch.device(device))
