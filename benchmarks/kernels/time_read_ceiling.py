"""The M=1 GEMV's read ceiling: a kernel that reads the same packed words in the same order with the
same grid (k-splits, one iteration loaded ahead) but decodes nothing. Question (run 12): W3 at M=1
sits at 72% of DRAM peak, and neither fewer instructions nor more resident warps moved it. If this
read-only kernel is as slow as the GEMV, the access order and grid are the limit; if it is near the
byte floor, the decode's latency is. "GEMV acc": the same GEMV adding its k-splits into a zeroed fp32
buffer (no split-K counter or read-back), to price the split-K epilogue. "+decode / +scales / +x": the
GEMV's loop built up in layers (``layered_kernel``), each split's partials stored plainly, to price what
the loop adds to the read (runs 12-13).

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_read_ceiling.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.dispatch import _split, gemv, sm_count  # noqa: E402
from kernels.gemv_h2 import _load_x, _row_dot, _stage_w, _zconst  # noqa: E402
from kernels.tuning import GemvConfig  # noqa: E402
from pipeline.evaluate.bench_kernels import _packed, time_cases  # noqa: E402


@triton.jit
def _words(p, T: tl.constexpr, WPR: tl.constexpr):
    """XOR of the WPR words of each decode row (W3: three rows of words T apart, as gemv_h2 loads them)."""
    w = tl.load(p, eviction_policy="evict_first")
    if WPR == 3:
        w = w ^ tl.load(p + T, eviction_policy="evict_first") ^ tl.load(p + 2 * T, eviction_policy="evict_first")
    return w


@triton.jit
def read_words_kernel(words_ptr, out_ptr, tile_stride, iters_per_split, n_iters, N,
                      T: tl.constexpr, BN: tl.constexpr, R: tl.constexpr, WPR: tl.constexpr):
    """Program (column tile, k-split): XOR of its words, R decode rows (WPR words each) per
    iteration, the next iteration's words requested before this one's are used (as gemv_h2 does)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    col = (n0 // T) * tile_stride + (n0 % T) + tl.arange(0, BN)
    col = tl.max_contiguous(tl.multiple_of(col, BN), BN)
    base = words_ptr + (tl.arange(0, R) * WPR)[:, None] * T + col[None, :]
    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    nxt = _words(base + it0 * (R * WPR * T), T, WPR)
    acc = tl.zeros([R, BN], dtype=tl.int32)
    for it in range(it0, it1):
        cur = nxt
        nxt = _words(base + tl.minimum(it + 1, it1 - 1) * (R * WPR * T), T, WPR)
        acc = acc ^ cur
    tl.store(out_ptr + pid_k * N + n0 + tl.arange(0, BN), tl.xor_sum(acc, axis=0))


@triton.jit
def layered_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr, out_ptr, rows_total, groups_pad, iters_per_split,
                   n_iters, N, K4, BITS: tl.constexpr, GROUP_ROWS: tl.constexpr, T: tl.constexpr,
                   BN: tl.constexpr, R: tl.constexpr, LEVEL: tl.constexpr, ASM: tl.constexpr):
    """gemv_h2's loop for M=1, asymmetric grouped weights, built up in layers: 1 the words decoded and
    multiplied, with x, scale and zero loaded once (the split's first iteration's); 2 scale and zero
    loaded per iteration with the words; 3 x too -- the GEMV's loop. Each split stores its fp32 partial
    sums plainly (no split-K epilogue); only level 3's are the product."""
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    QPR: tl.constexpr = 8 if BITS == 3 else 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    col = (n0 // T) * (rows_total * WPR * T) + (n0 % T) + tl.arange(0, BN)
    col = tl.max_contiguous(tl.multiple_of(col, BN), BN)
    sz_col = (n0 // T) * (groups_pad * T) + (n0 % T) + tl.arange(0, BN)
    sz_col = tl.max_contiguous(tl.multiple_of(sz_col, BN), BN)
    r_loc = tl.arange(0, R)
    m3 = tl.arange(0, 1)[:, None, None]
    wbase = words_ptr + (r_loc * WPR)[None, :, None] * T + col[None, None, :]
    qi0 = r_loc[None, :, None] * QPR
    xbase = x_ptr + qi0
    szbase = sz_col[None, None, :] + 0 * r_loc[None, :, None]
    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    a0, a1, a2, a_s, a_z = _stage_w(it0, wbase, szbase, scale_ptr, zero_ptr, BITS, False, False, GROUP_ROWS, T, R, 1)
    c0, c1, c2, c3, c4, c5, c6, c7 = _load_x(xbase + it0 * (R * QPR), x_ptr, qi0 + it0 * (R * QPR), 1, K4, m3, QPR,
                                             True, ASM)
    aq0, aq1, aq2, aq3, aq4, aq5, aq6, aq7 = c0, c1, c2, c3, c4, c5, c6, c7
    s_c = a_s
    z_c = a_z
    y3 = tl.zeros([1, R, BN], dtype=tl.float32)
    for it in range(it0, it1):
        w0, w1, w2 = a0, a1, a2
        if LEVEL >= 2:
            s, z = a_s, a_z
        else:
            s, z = s_c, z_c
        if LEVEL >= 3:
            q0, q1, q2, q3, q4, q5, q6, q7 = aq0, aq1, aq2, aq3, aq4, aq5, aq6, aq7
            aq0, aq1, aq2, aq3, aq4, aq5, aq6, aq7 = _load_x(
                xbase + tl.minimum(it + 1, it1 - 1) * (R * QPR), x_ptr, qi0 + tl.minimum(it + 1, it1 - 1) * (R * QPR),
                1, K4, m3, QPR, True, ASM)
        else:
            q0, q1, q2, q3, q4, q5, q6, q7 = c0, c1, c2, c3, c4, c5, c6, c7
        a0, a1, a2, a_s, a_z = _stage_w(tl.minimum(it + 1, it1 - 1), wbase, szbase, scale_ptr, zero_ptr, BITS, False,
                                        False, GROUP_ROWS, T, R, 1)
        zf, za, zb, zc = _zconst(z, 0, False, BITS, z, ASM)
        y3 += _row_dot(w0, w1, w2, q0, q1, q2, q3, q4, q5, q6, q7, zf, za, zb, zc, BITS, ASM) * s.to(tl.float32)
    y = tl.sum(y3, axis=1)  # [1, BN]
    tl.store(out_ptr + pid_k * N + n0 + tl.arange(0, BN)[None, :], y)


def layered(x: torch.Tensor, pw, out: torch.Tensor, level: int, bn: int, r: int, split: int, per: int,
            iters: int, warps: int, asm: bool) -> torch.Tensor:
    """Launch ``layered_kernel``; ``out``: fp32 [split, N] partial sums."""
    layered_kernel[(pw.out_features // bn, split)](
        x.view(torch.int64), pw.words, pw.scale, pw.zero, out, pw.rows, pw.scale.shape[1], per, iters,
        pw.out_features, pw.in_features // 4, BITS=pw.bits, GROUP_ROWS=pw.group_rows, T=pw.tile, BN=bn, R=r,
        LEVEL=level, ASM=asm, num_warps=warps)
    return out


def main() -> None:
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    sms = sm_count(torch.device("cuda"))
    # (bits, BN, decode rows per iteration, waves, warps, the GEMV config it mirrors)
    variants = [(3, 128, 4, 6.0, 4, GemvConfig(BN=128, R=4, waves=6.0, h2=True)),
                (3, 64, 4, 14.0, 2, GemvConfig(BN=64, R=4, num_warps=2, waves=14.0, h2=True, maxnreg=72)),
                (4, 64, 16, 8.0, 4, GemvConfig(BN=64, R=16, waves=8.0, h2=True, evict=2))]
    for k, n in ((8192, 28672), (28672, 8192)):
        x = torch.randn(1, k, device="cuda", generator=gen).half()
        cases = []  # the timers hold each case's function, and so its weights
        for bits, bn, r, waves, warps, cfg in variants:
            pws = [_packed(bits, 128, False, k, n, "cuda", gen) for _ in range(4)]  # 4 copies > the 50 MB L2
            pw = pws[0]
            wpr = 3 if bits == 3 else 1
            iters = pw.words.shape[1] // (r * wpr)  # k_pad == k for these shapes
            n_tiles = pw.out_features // bn
            split, per = _split(n_tiles, iters, None, sms, waves, floor=True)
            out = torch.empty(split, n, dtype=torch.int32, device="cuda")

            def read(i, pws=pws, out=out, n_tiles=n_tiles, split=split, per=per, iters=iters, bn=bn, r=r, wpr=wpr,
                     warps=warps):
                p = pws[i % 4]
                read_words_kernel[(n_tiles, split)](p.words, out, p.words.shape[1] * p.tile, per, iters, n,
                                                    T=p.tile, BN=bn, R=r, WPR=wpr, num_warps=warps)

            def mv(i, pws=pws, cfg=cfg):
                return gemv(x, pws[i % 4], cfg=cfg)

            acc = torch.zeros(1, n, dtype=torch.float32, device="cuda")

            def mv_acc(i, pws=pws, cfg=cfg, acc=acc):  # k-splits add into a zeroed fp32 buffer: no counter,
                acc.zero_()  # no last-arrival read-back (decode's mode); the zeroing is timed with it
                return gemv(x, pws[i % 4], out=acc, cfg=cfg, accumulate=True)

            part = torch.empty(split, n, dtype=torch.float32, device="cuda")

            def lay(level, pws=pws, part=part, bn=bn, r=r, split=split, per=per, iters=iters, warps=warps):
                return lambda i: layered(x, pws[i % 4], part, level, bn, r, split, per, iters, warps, True)

            label = f"W{bits} BN{bn} R{r} x{waves:g} w{warps} ({n_tiles}x{split} programs)"
            cases += [(f"read only  {label}", read), (f"+decode    {label}", lay(1)),
                      (f"+scales    {label}", lay(2)), (f"+x (loop)  {label}", lay(3)),
                      (f"GEMV acc   {label}", mv_acc), (f"GEMV       {label}", mv)]
        print(f"{k} -> {n}, M=1", flush=True)
        for name, us in time_cases(cases):
            print(f"  {name:<62} {us:6.1f} us", flush=True)
        del cases
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
