"""M=2048: does cuBLAS multiply faster with the 16-bit weight in another layout? Question (run 12):
dequantize + cuBLAS stops at ~0.87x of F.linear because writing the fp16 weight costs ~13% of the
GEMM; if cuBLAS ran x @ W with W stored [in, out] (NN) a few % faster than F.linear's [out, in]
(TN), a dequantize that writes [in, out] would pass 0.9x. Timed interleaved in CUDA graphs.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_layouts.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.dispatch import dequantize  # noqa: E402
from pipeline.evaluate.bench_kernels import _packed, capture, time_interleaved  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from time_chunked import large_m_inputs  # noqa: E402


def main() -> None:
    m = 2048
    for k, n, x, w16, gen in large_m_inputs(m):
        wt = w16.t().contiguous()  # [in, out]
        pw = _packed(4, 128, False, k, n, "cuda", gen)
        scratch = torch.empty(n, k, device="cuda", dtype=torch.float16)
        cases = {
            "F.linear (TN, the baseline)": lambda i: F.linear(x, w16),
            "x @ W[in,out] (NN)": lambda i: torch.mm(x, wt),
            "W[out,in] @ x^T (y^T)": lambda i: torch.mm(w16, x.t()),
            "dequantize W4 alone": lambda i: dequantize(pw, out=scratch),
            "dequantize W4 + F.linear": lambda i: F.linear(x, dequantize(pw, out=scratch)),
        }
        timers = [capture(fn, 3) for fn in cases.values()]
        times = time_interleaved(timers, 12)
        base = times[0]
        print(f"{k} -> {n}, M={m}")
        for name, us in zip(cases, times):
            print(f"  {name:<30} {us:8.1f} us  x{base / us:.3f} of F.linear")
        del timers
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
