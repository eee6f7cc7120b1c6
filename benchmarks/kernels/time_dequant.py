"""Large-M path split in its two parts (device only): the dequantize kernel alone vs the bytes it
moves, and cuBLAS on the 16-bit result, for 8192 -> 28672 at M = 2048 (issue #3 target 0.9x).

    python3 benchmarks/kernels/time_dequant.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from kernels.dispatch import dequantize  # noqa: E402
from pipeline.evaluate.bench_kernels import _packed, copy_bandwidth, time_graph  # noqa: E402


def main() -> None:
    k, n, m = 8192, 28672, 2048
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    bw = copy_bandwidth()
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    w16 = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
    t_mm = time_graph(lambda i: torch.nn.functional.linear(x, w16), calls=3, reps=10)
    print(f"copy {bw / 1e12:.2f} TB/s; cuBLAS fp16 M={m}: {t_mm:.0f} us")
    for bits in (4, 3):
        pws = [_packed(bits, 128, False, k, n, "cuda", gen) for _ in range(2)]
        for bk in (64, 128):
            t = time_graph(lambda i: dequantize(pws[i % 2], torch.float16, bk=bk), calls=4, reps=10)
            moved = pws[0].nbytes() + n * k * 2
            print(f"W{bits} dequantize bk={bk}: {t:.0f} us = {moved / t / 1e3:.0f} GB/s "
                  f"(floor {moved / bw * 1e6:.0f} us); + cuBLAS = {t + t_mm:.0f} us -> {t_mm / (t + t_mm):.2f}x")


if __name__ == "__main__":
    main()
