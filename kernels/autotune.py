"""Pick the fastest launch for a shape on first use (CUDA only), like ``triton.autotune``.

Why at run time: the best path (CUDA-core GEMV, tensor-core split-K, fused GEMM, or dequantize +
cuBLAS) and its block shapes depend on M, N, K and the GPU; a static table tuned on one shape
was 10-30% off on others. Each candidate is compiled and timed a few times on the real inputs
during the first eager call (never inside CUDA-graph capture: warm up first); the winner is kept
per (bits, group, symmetric, dtype, M bucket, N, K, device) for the life of the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

_BEST: dict[tuple, Callable] = {}
_TRACE: dict[tuple, list[tuple[str, float]]] = {}
_NAME: dict[tuple, str] = {}
_LAST: list[str | None] = [None]


def enabled(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and os.environ.get("VLMQ_AUTOTUNE", "1") != "0"


def m_bucket(m: int) -> int:
    return m if m <= 4 else 1 << (m - 1).bit_length()


_FLUSH: dict[int | None, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Overwrite a buffer larger than L2, so a timed call reads its weights from DRAM as in a
    model's forward (a small layer timed back to back sits in L2 and favours other configs)."""
    buf = _FLUSH.get(device.index)
    if buf is None:
        buf = _FLUSH[device.index] = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    buf.fill_(1)


def time_candidates(cands: list[tuple[str, Callable]], args: tuple, reps: int = 12) -> list[tuple[str, float]]:
    """Median ms of each candidate ``fn(*args)`` over ``reps`` L2-cold calls (failures are skipped),
    GPU time only, by CUDA events: what a CUDA graph replay pays. Run 4 saw 8 back-to-back eager
    reps pick a config 14% slower than the sweep's best."""
    out = []
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cuda"))
    for name, fn in cands:
        try:
            for _ in range(2):
                fn(*args)
            ts = []
            for _ in range(reps):
                _flush_l2(dev)
                # keep the GPU busy while Python enqueues the call: the events then time the kernel,
                # not its launch (run 5: launch cost made the slower fp32 GEMV win over the h2 one)
                torch.cuda._sleep(200_000)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(*args)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            out.append((name, sorted(ts)[len(ts) // 2]))
        except Exception:  # a config that does not compile or fit on this GPU is simply not chosen
            continue
    return out


def pick(key: tuple, cands: list[tuple[str, Callable]], args: tuple,
         timer: Callable[[list, tuple], list[tuple[str, float]]] = time_candidates) -> Callable | None:
    """The cached winner for ``key``, else time each ``fn(*args)`` of ``cands`` and cache the fastest
    (None if none ran). Candidates must not depend on the particular tensors of this call."""
    if key in _BEST:
        _LAST[0] = _NAME[key]
        return _BEST[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("kernels: first call of a new shape inside CUDA-graph capture; "
                           "run one eager forward with the same shapes before capturing")
    times = timer(cands, args)
    if not times:
        return None
    _TRACE[key] = times
    best = min(times, key=lambda t: t[1])[0]
    fn = dict(cands)[best]
    _BEST[key], _NAME[key], _LAST[0] = fn, best, best
    return fn


def last() -> str | None:
    """Name of the candidate the most recent ``pick`` returned (for benchmark reports)."""
    return _LAST[0]


def choice(key: tuple) -> str | None:
    """Name of the candidate chosen for ``key`` (for reports)."""
    t = _TRACE.get(key)
    return None if not t else min(t, key=lambda v: v[1])[0]


def trace() -> dict[tuple, list[tuple[str, float]]]:
    return dict(_TRACE)
