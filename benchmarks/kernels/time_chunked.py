"""Large M in column chunks: dequantize chunk c into one scratch buffer small enough to stay in the
50 MB L2, multiply it by cuBLAS, next chunk into the same buffer. Question (run 11): does keeping the
16-bit weight out of DRAM (no 470 MB write + read back) pay for the smaller cuBLAS GEMMs? Run 6's
overlap of chunks on a second stream did not; this is sequential, one stream.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_chunked.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.dispatch import dequantize  # noqa: E402
from kernels.layout import PackedWeight  # noqa: E402
from pipeline.evaluate.bench_kernels import _packed, time_graph  # noqa: E402


def columns(pw: PackedWeight, c0: int, c1: int) -> PackedWeight:
    """Output features [c0, c1) of ``pw`` as a zero-copy view (c0, c1 multiples of the tile)."""
    t = pw.tile
    z = None if pw.zero is None else pw.zero[c0 // t:c1 // t]
    return PackedWeight(pw.words[c0 // t:c1 // t], pw.scale[c0 // t:c1 // t], z, pw.bits, pw.group_size,
                        pw.symmetric, pw.in_features, c1 - c0, t)


def large_m_inputs(m: int = 2048):
    """(k, n, x [m, k], fp16 weight [n, k], generator) for the three big shapes, fixed seed."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    for k, n in ((8192, 28672), (28672, 8192), (8192, 8192)):
        x = torch.randn(m, k, device="cuda", generator=gen).half()
        w16 = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
        yield k, n, x, w16, gen


def main() -> None:
    m = 2048
    for k, n, x, w16, gen in large_m_inputs(m):
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        t_mm = time_graph(lambda i: F.linear(x, w16), calls=3, reps=10)
        print(f"{k} -> {n} M={m}: cuBLAS fp16 {t_mm:.0f} us", flush=True)
        for bits in (4, 3):
            pws = [_packed(bits, 128, False, k, n, "cuda", gen) for _ in range(2)]
            ref = F.linear(x, dequantize(pws[0]))
            t = time_graph(lambda i: F.linear(x, dequantize(pws[i % 2])), calls=3, reps=10)
            print(f"  W{bits} dequantize + cuBLAS: {t:.0f} us -> {t_mm / t:.3f}x", flush=True)
            for chunk in (1024, 2048, 3584, 4096):
                if n % chunk:
                    continue
                buf = torch.empty(chunk, k, device="cuda", dtype=torch.float16)
                parts = [[columns(pw, c0, c0 + chunk) for c0 in range(0, n, chunk)] for pw in pws]

                def run(i, parts=parts, buf=buf, chunk=chunk):
                    for j, sub in enumerate(parts[i % 2]):
                        torch.mm(x, dequantize(sub, out=buf).t(), out=out[:, j * chunk:(j + 1) * chunk])

                run(0)
                err = float((out.float() - ref.float()).abs().max())
                t = time_graph(run, calls=3, reps=10)
                w16c = w16[:chunk]
                t_c = time_graph(lambda i, w16c=w16c, chunk=chunk: [torch.mm(x, w16c.t(), out=out[:, j:j + chunk])
                                                                    for j in range(0, n, chunk)], calls=3, reps=10)
                print(f"  W{bits} chunks of {chunk:5d}: {t:.0f} us -> {t_mm / t:.3f}x  (cuBLAS alone in these "
                      f"chunks {t_c:.0f} us = {t_mm / t_c:.3f}x; max |diff| vs unchunked {err:.3g})", flush=True)


if __name__ == "__main__":
    main()
