"""The M=1 GEMV's read ceiling: a kernel that reads the same packed words in the same order with the
same grid (k-splits, one iteration loaded ahead) but decodes nothing. Question (run 12): W3 at M=1
sits at 72% of DRAM peak, and neither fewer instructions nor more resident warps moved it. If this
read-only kernel is as slow as the GEMV, the access order and grid are the limit; if it is near the
byte floor, the decode's latency is. "GEMV acc": the same GEMV adding its k-splits into a zeroed fp32
buffer (no split-K counter or read-back), to price the split-K epilogue.

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
from kernels.tuning import GemvConfig  # noqa: E402
from pipeline.evaluate.bench_kernels import _packed, capture, time_interleaved  # noqa: E402


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
        names, timers, keep = [], [], []
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

            label = f"W{bits} BN{bn} R{r} x{waves:g} w{warps} ({n_tiles}x{split} programs)"
            for name, fn in ((f"read only  {label}", read), (f"GEMV       {label}", mv),
                             (f"GEMV acc   {label}", mv_acc)):
                fn(0)
                names.append(name)
                timers.append(capture(fn, 20))
            keep.append(pws)
        times = time_interleaved(timers, 15)
        print(f"{k} -> {n}, M=1", flush=True)
        for name, us in zip(names, times):
            print(f"  {name:<62} {us:6.1f} us", flush=True)
        del timers, keep
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
