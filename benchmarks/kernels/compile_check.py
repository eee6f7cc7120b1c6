"""Compile every kernel in the configurations the dispatcher and the sweep use, for sm_90, on the
CPU machine (no GPU needed). Run it with the GPU machine's Triton version too:

    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/kernels/compile_check.py   # triton 3.6 wheel
"""

from __future__ import annotations

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import triton  # noqa: E402

from inspect_sass import GEMV_SIG, compile_kernel, resource_usage  # noqa: E402


def main() -> int:
    from kernels.gemm import gemm_kernel
    from kernels.gemv import gemv_kernel
    from kernels.w4a8 import quant_act_kernel, w4a8_kernel

    print("triton", triton.__version__)
    fails = 0
    t0 = time.time()
    jobs = []
    for bits, sym, dt in itertools.product([2, 3, 4, 8], [False, True], ["fp16", "bf16"]):
        v = 32 if bits == 3 else 32 // bits
        for group in (128, 32, 0):
            gr = max(group // v, 1) if group else 4
            for bm, bn, r in [(1, 128, min(4, gr) if group else 4), (2, 256, min(2, gr) if group else 2)]:
                sig = {**{k: v2 for k, v2 in GEMV_SIG.items() if k != "magic"}, "n_iters": "i32", "magic": "i32"}
                for k2 in ("x_ptr", "scale_ptr", "bias_ptr", "out_ptr"):
                    sig[k2] = "*" + dt
                c = dict(BITS=bits, SYM=sym, PER_CHANNEL=group == 0, GROUP_ROWS=gr, T=256, BM=bm, BN=bn, R=r,
                         HAS_BIAS=True, SPLIT=True, EVICT=True, EVEN=bm == 1)
                jobs.append((f"gemv b{bits} sym={sym} {dt} g{group} BM{bm}", gemv_kernel, sig, c, 4, 3))
        if group := 128:
            for bm, bn, bk, w, st, tr in [(16, 128, 128, 4, 3, True), (64, 128, 128, 4, 3, True),
                                          (128, 256, 64, 8, 3, False), (128, 128, 64, 8, 3, False)]:
                if bits == 3 and bk == 128 and tr:
                    bk = 64
                sig = dict(GEMV_SIG)
                for k2 in ("x_ptr", "scale_ptr", "bias_ptr", "out_ptr"):
                    sig[k2] = "*" + dt
                gr = max(group // v, 1)
                c = dict(BITS=bits, SYM=sym, PER_CHANNEL=False, GROUP_ROWS=gr, T=256, BM=bm, BN=bn, BK=bk,
                         GROUP_M=8, HAS_BIAS=True, SPLIT=tr, EVICT=tr, TRANS=tr, DOT_F32=False)
                jobs.append((f"gemm b{bits} sym={sym} {dt} BM{bm} BN{bn} BK{bk} tr={tr}", gemm_kernel, sig, c, w, st))
    for bits, fuse, tr, dt in itertools.product([4, 8], [False, True], [False, True], ["fp16", "bf16"]):
        sig = {"x_ptr": "*i8" if not fuse else "*" + dt, "sx_ptr": "*fp32", "words_ptr": "*i32", "sw_ptr": "*" + dt,
               "bias_ptr": "*" + dt, "out_ptr": "*" + dt, "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
               "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "rows_total": "i32",
               "iters_per_split": "i32"}
        bm, bn, bk, w = (16, 128, 128, 4) if tr else (128, 128, 64, 8)
        c = dict(BITS=bits, T=256, BM=bm, BN=bn, BK=bk, GROUP_M=8, FUSE=fuse, TRANS=tr, HAS_BIAS=False,
                 SPLIT=tr, EVICT=False)
        jobs.append((f"w4a8 b{bits} fuse={fuse} tr={tr} {dt}", w4a8_kernel, sig, c, w, 3))
    for dt in ("fp16", "bf16"):
        sig = {"x_ptr": "*" + dt, "q_ptr": "*i8", "s_ptr": "*fp32", "M": "i32", "K": "i32", "stride_xm": "i32",
               "stride_qm": "i32"}
        jobs.append((f"quant_act {dt}", quant_act_kernel, sig, {"BK": 1024}, 4, 3))
    for name, fn, sig, c, w, st in jobs:
        try:
            k = compile_kernel(fn, sig, c, w, st)
            ru = resource_usage(k)
            regs = ru.split("REG:")[1].split()[0] if "REG:" in ru else "?"
            stack = ru.split("STACK:")[1].split()[0] if "STACK:" in ru else "?"
            flag = "  <-- spills" if stack not in ("0", "?") else ""
            print(f"ok   {name:<60} regs={regs} stack={stack} smem={k.metadata.shared}{flag}", flush=True)
        except Exception as e:
            fails += 1
            while e.__cause__ is not None or e.__context__ is not None:
                e = e.__cause__ or e.__context__
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[-400:]}", flush=True)
    print(f"{len(jobs)} kernels, {fails} failures, {time.time() - t0:.0f}s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
