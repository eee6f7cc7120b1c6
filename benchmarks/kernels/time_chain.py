"""The cost of a kernel boundary in the decode step: a chain of dependent kernels that do almost nothing
(each program reads what the previous kernel wrote and writes it back plus one), captured in a CUDA graph,
with and without programmatic dependent launch, for a one-program grid (the glue kernels) and a GEMV-sized
grid (4 programs per SM). Microseconds per kernel = the launch, the wait for the previous grid to finish
and flush, and the ramp: what a layer's 6 launches pay before any byte of weight counts (run 14).

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_chain.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.dispatch import sm_count  # noqa: E402
from kernels.pdl import launch_dependents, launch_kwargs, wait_prior  # noqa: E402
from pipeline.evaluate.bench_kernels import time_cases  # noqa: E402


@triton.jit
def _step_kernel(buf_ptr, PDL: tl.constexpr, N: tl.constexpr):
    """Program p: buf[p] += 1 (N values per program, so the grid's stores span it), after the PDL wait."""
    if PDL:
        z = wait_prior()
    else:
        z = 0
    offs = tl.program_id(0) * N + tl.arange(0, N) + z
    v = tl.load(buf_ptr + offs)
    if PDL:
        launch_dependents()
    tl.store(buf_ptr + offs, v + 1)


def main() -> None:
    dev = torch.device("cuda")
    sms = sm_count(dev)
    print(f"{torch.cuda.get_device_name()} ({sms} SMs); µs per kernel in a graph of 168 dependent kernels")
    cases = []
    for grid in (1, 4 * sms):
        for pdl in (0, 1):
            buf = torch.zeros(grid * 128, dtype=torch.float32, device=dev)

            def fn(i, buf=buf, grid=grid, pdl=pdl):
                _step_kernel[(grid,)](buf, PDL=pdl, N=128, num_warps=4, **launch_kwargs(pdl))

            cases.append((f"{grid:4d} programs, PDL {'on ' if pdl else 'off'}", fn))
    for name, us in time_cases(cases, calls=168, reps=15):
        print(f"  {name}: {us:6.2f} µs per kernel, {6 * us:6.1f} µs for a layer's 6 launches")


if __name__ == "__main__":
    main()
