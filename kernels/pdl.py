"""Programmatic dependent launch (PDL): let a kernel start while the one before it finishes.

Why: single-token decode is a chain of ~9 launches per layer, most of them a few µs long. In a CUDA
graph each still waits for the previous grid to drain, and a GEMV then spends its first µs with
no weight bytes in flight. With PDL (Hopper+) a kernel launched with ``launch_pdl=True`` may be
scheduled as soon as every program of the previous grid has called ``launch_dependents`` (or
exited); it issues whatever does not depend on that grid -- for a GEMV, its first tile of weights
-- then waits (``griddepcontrol.wait``) until the previous grid has completed and its writes are
visible, and only then reads activations or writes anything.

Opt-in and scoped: ``with programmatic_launch():`` turns it on for the kernels launched inside
(the decode bench); everything else, the autotuner's timing included, launches as before.
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("vlmq_pdl", default=False)


@contextmanager
def programmatic_launch(on: bool = True) -> Iterator[None]:
    """Launch the PDL-aware kernels (fp16-pair GEMV, decode glue) with PDL inside this block."""
    token = _ON.set(on)
    try:
        yield
    finally:
        _ON.reset(token)


@functools.lru_cache(maxsize=None)
def _supported(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def active(device: torch.device, force: bool = False) -> bool:
    """PDL for a launch on ``device`` now: switched on (or ``force``), a Hopper-or-newer GPU, not the
    interpreter (which has no grids to overlap)."""
    if not (force or _ON.get()) or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return _supported(device.index)


def mode(device: torch.device, force: bool = False) -> int:
    """The kernels' PDL constexpr: 0 off; 1 release the next grid late (a GEMV after its loop, a glue
    kernel after its wait); 2 early (before waiting: the grid after next may then start fetching
    weights while this one's predecessor still runs). ``VLMQ_PDL_TRIGGER=early`` picks 2."""
    if not active(device, force):
        return 0
    return 2 if os.environ.get("VLMQ_PDL_TRIGGER", "late") == "early" else 1


def launch_kwargs(on: bool | int) -> dict:
    return {"launch_pdl": True} if on else {}


@triton.jit
def wait_prior():
    """``griddepcontrol.wait``; returns int32 0 from the same asm, to add to addresses that pure
    (reorderable) inline-asm loads use, so those loads cannot be hoisted above the wait."""
    return tl.inline_asm_elementwise("griddepcontrol.wait;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def launch_dependents():
    """Let the next grid be scheduled once every program of this one has passed this point."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def grid_sync(bar_ptr, nprog):
    """A barrier across all ``nprog`` programs of a persistent launch (every one resident at once, or
    it never returns): ``bar_ptr[0]`` counts arrivals, ``bar_ptr[1]`` is the epoch the last arrival
    advances (both int32, zero before the first launch; the last arrival resets the count, so the
    pair is reusable, in graphs too). Writes before it are visible to coherent reads after it.
    Returns int32 0 from an opaque asm, to add to the addresses of pure inline-asm loads that must
    not be hoisted above the barrier (as ``wait_prior``). GPU only (the interpreter runs programs one
    after another). Used by ``gemv_h2``'s PDL mode 3 in run 15's persistent-launch experiment
    (benchmarks/kernels/time_mlp_chain.py), where it cost ~0.9 µs more than the launch boundary it
    replaced, so no product path uses it."""
    tl.debug_barrier()
    e0 = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    old = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
    if old == nprog - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
    else:
        e = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
        while e == e0:  # a poll every ~0.1 µs per program keeps the counter's L2 slice free for the arrivals
            tl.inline_asm_elementwise("nanosleep.u32 100;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                      pack=1)
            e = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    return tl.inline_asm_elementwise("mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
