"""Large M: dequantize the next column chunk on a few SMs that cuBLAS is told to leave free, while cuBLAS
multiplies the chunk before. Question (run 15): can the 470 MB fp16 weight write (~222 µs, the gap
between dequantize + cuBLAS at 0.86-0.89x and the 0.9x target) hide under the GEMM?

Run 6 overlapped chunks on a second stream and gained nothing: cuBLAS keeps every SM busy, so the
dequantize waited for SMs. ``torch._C._set_sm_carveout_experimental(n)`` asks cuBLAS(Lt) for a grid
that leaves n SMs free. First check that it reaches the GEMM F.linear runs: the fp16 GEMM alone at
several carveouts, with the default BLAS library and with cuBLASLt. Then the overlapped path: chunk j+1
dequantized on a side stream into the other of two buffers while chunk j is multiplied.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_carveout.py

Outcome (run 15, `runs/run15_carveout.log`): the carveout reaches only cuBLASLt (the default library's
GEMM ignores it), and there it costs more than the SMs it frees: 8192 -> 28672 1414 -> 1662 µs at 16 SMs,
1835 at 32. Every overlapped path with a carveout lost (0.64-0.82x). Without one, 4 chunks gave 0.894-0.897x
on 8192 -> 28672 (0.870 unchunked) but 0.856-0.867x on 28672 -> 8192 (0.880): not adopted.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.dispatch import dequantize  # noqa: E402
from pipeline.evaluate.bench_kernels import _packed, time_cases  # noqa: E402
from time_chunked import columns  # noqa: E402

M = 2048


def carveout(n: int | None) -> None:
    torch._C._set_sm_carveout_experimental(n)


def with_carveout(fn, n: int | None, lib: str | None = None):
    """``fn`` run (and so captured) with cuBLAS asked to leave ``n`` SMs free, on BLAS library ``lib``."""
    def run(i):
        prev = torch.backends.cuda.preferred_blas_library()
        if lib:
            torch.backends.cuda.preferred_blas_library(lib)
        carveout(n)
        try:
            return fn(i)
        finally:
            carveout(None)
            torch.backends.cuda.preferred_blas_library(prev)
    return run


def overlapped(x, pws, chunks: int, out, bufs, side: torch.cuda.Stream):
    """Chunk j's GEMM on the current stream, chunk j+1's dequantize on ``side`` (two buffers)."""
    n = out.shape[1]
    cs = n // chunks
    parts = [[columns(pw, c0, c0 + cs) for c0 in range(0, n, cs)] for pw in pws]

    def run(i):
        main = torch.cuda.current_stream()
        sub = parts[i % 2]
        done_deq = [torch.cuda.Event() for _ in range(chunks)]
        done_mm = [torch.cuda.Event() for _ in range(chunks)]
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dequantize(sub[0], out=bufs[0])
            done_deq[0].record(side)
        for j in range(chunks):
            if j + 1 < chunks:
                with torch.cuda.stream(side):
                    if j >= 1:  # the buffer chunk j+1 goes into held chunk j-1
                        side.wait_event(done_mm[j - 1])
                    dequantize(sub[j + 1], out=bufs[(j + 1) % 2])
                    done_deq[j + 1].record(side)
            main.wait_event(done_deq[j])
            torch.mm(x, bufs[j % 2].t(), out=out[:, j * cs:(j + 1) * cs])
            done_mm[j].record(main)
        main.wait_stream(side)
    return run


def main() -> None:
    side = torch.cuda.Stream()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}; {sms} SMs; M={M}; interleaved graphs, median of 15 replays")
    for k, n in ((8192, 28672), (28672, 8192)):
        x = torch.randn(M, k, device="cuda", generator=gen).half()
        w16 = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
        cases = [(f"cuBLAS carveout {c} {lib or 'default'}", with_carveout(lambda i: F.linear(x, w16), c, lib))
                 for lib in (None, "cublaslt") for c in (None, 16, 32)]
        for name, t in time_cases(cases, calls=3):
            print(f"  {k} -> {n}  {name:36s} {t:8.1f} us", flush=True)
        t_mm = dict(time_cases(cases[:1], calls=3))[cases[0][0]]
        pws = [_packed(4, 128, False, k, n, "cuda", gen) for _ in range(2)]
        ref = F.linear(x, dequantize(pws[0]))
        out = torch.empty(M, n, device="cuda", dtype=torch.float16)
        cases = [("W4 dequantize + cuBLAS", lambda i: F.linear(x, dequantize(pws[i % 2])))]
        for chunks in (2, 4):
            cs = n // chunks
            bufs = [torch.empty(cs, k, device="cuda", dtype=torch.float16) for _ in range(2)]
            for c in (None, 8, 16, 32):
                for lib in (None, "cublaslt"):
                    cases.append((f"W4 {chunks} chunks, carveout {c} {lib or 'default'}",
                                  with_carveout(overlapped(x, pws, chunks, out, bufs, side), c, lib)))
            cases[-1][1](0)
            torch.cuda.synchronize()
            err = float((out.float() - ref.float()).abs().max())
            if not err < 1e-2 * float(ref.float().abs().max()):
                raise SystemExit(f"overlapped chunks disagree with dequantize + cuBLAS: max |diff| {err}")
        for name, t in time_cases(cases, calls=3):
            print(f"  {k} -> {n}  {name:40s} {t:8.1f} us  {t_mm / t:.3f}x cuBLAS", flush=True)


if __name__ == "__main__":
    main()
