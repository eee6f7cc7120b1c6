"""The M=16 fp16-pair GEMM's read ceiling (run 13). W4 M=16 runs 57-59 µs on 8192 -> 28672 (2.8-3.0x cuBLAS,
target 3x) but 53-55 on 28672 -> 8192, and neither more resident programs (stream-K) nor more bytes in
flight (deeper register prefetch) moved it. Which part costs: the words in gemm_h2's fragment order with
the same grid and one k-block ahead (level 1), plus x's [BM, 128] tile per k-block through the same
``tl.dot`` against a constant tile (level 2: the x pipeline and the MMAs, no decode), against the GEMM.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_tc_ceiling.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.dispatch import _split, gemm, sm_count  # noqa: E402
from kernels.gemm_h2 import BK_H2, _index, _loads  # noqa: E402
from kernels.tuning import GemmConfig  # noqa: E402
from pipeline.evaluate.bench_kernels import _packed, time_cases  # noqa: E402


@triton.jit
def tc_read_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K, stride_xm, rows_total, groups_pad,
                   iters_per_split, n_iters, BITS: tl.constexpr, GROUP_ROWS: tl.constexpr, T: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, LEVEL: tl.constexpr, ASM: tl.constexpr):
    """Program (column tile, k-split) of gemm_h2's grid: XOR of its words, scales and zeros (loaded as
    gemm_h2 loads them, one k-block ahead; each scale and zero is XORed an even number of times, so the
    result is the words'); LEVEL 2 also multiplies each k-block's x tile by a constant fp16 tile of ones
    on the tensor cores. Stores, at 512 int32 per program, the XOR folded to 32 per 64 columns and (level
    2) the dot's column sums as fp32 bits at offset 256."""
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    pid_n = tl.program_id(0)
    it0 = tl.program_id(1) * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    n0 = pid_n * BN
    NR: tl.constexpr = BN // 64
    KB: tl.constexpr = 4 if BITS == 4 else 1
    kb, rows, c = _index(NR, KB)
    wbase = (n0 // T) * (rows_total * WPR * T) + (n0 % T) + rows
    szbase = (n0 // T) * (groups_pad * T) + (n0 % T) + rows
    offs_m = tl.arange(0, BM)
    kk0 = tl.arange(0, BK_H2)
    ones = tl.full([BN, BK_H2], 1.0, tl.float16)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    h = tl.zeros_like(kb + rows + c)
    nw0, nw1, nw2, ns, nz = _loads(words_ptr, scale_ptr, zero_ptr, it0, wbase, szbase, kb, c, BITS, False, False,
                                   GROUP_ROWS, T, ASM)
    for it in range(it0, it1):
        w0, w1, w2, s, z = nw0, nw1, nw2, ns, nz
        nw0, nw1, nw2, ns, nz = _loads(words_ptr, scale_ptr, zero_ptr, tl.minimum(it + 1, it1 - 1), wbase, szbase,
                                       kb, c, BITS, False, False, GROUP_ROWS, T, ASM)
        h = h ^ w0 ^ w1 ^ w2 ^ s.to(tl.int16, bitcast=True).to(tl.int32) ^ z.to(tl.int32)
        if LEVEL >= 2:
            kk = it * BK_H2 + kk0
            xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                         mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            acc = tl.dot(ones, tl.trans(xa), acc)
    col = tl.reshape(tl.xor_sum(tl.xor_sum(tl.xor_sum(h, axis=5), axis=1), axis=0), (NR * 4 * 8,))
    base = out_ptr + (tl.program_id(1) * tl.num_programs(0) + pid_n) * 512
    tl.store(base + tl.arange(0, NR * 32), col)  # [nr, nh, nl]: columns nr*64 + nh*16 + nl and + 8, folded
    if LEVEL >= 2:
        tl.store(base + 256 + tl.arange(0, BM), tl.sum(acc, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def tc_read128_kernel(words_ptr, out_ptr, rows_total, iters_per_split, n_iters, T: tl.constexpr, BN: tl.constexpr,
                      RPB: tl.constexpr):
    """The same words and grid as ``tc_read_kernel`` level 1 (W4: 16 word rows per k-block), but each
    thread reads 4 adjacent words of a row with one 16-byte load: [rows, BN / 4 threads, 4]. What a lane
    would read if the tile's column order let its fragment rows be adjacent in memory (run 13)."""
    pid_n = tl.program_id(0)
    it0 = tl.program_id(1) * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    n0 = pid_n * BN
    r = tl.arange(0, RPB)[:, None]
    cols = (n0 // T) * (rows_total * T) + (n0 % T) + tl.arange(0, BN)[None, :]
    base = words_ptr + r * T + tl.max_contiguous(tl.multiple_of(cols, [1, 4]), [1, 4])
    nxt = tl.load(base + it0 * (RPB * T), eviction_policy="evict_first")
    h = tl.zeros([RPB, BN], dtype=tl.int32)
    for it in range(it0, it1):
        cur = nxt
        nxt = tl.load(base + tl.minimum(it + 1, it1 - 1) * (RPB * T), eviction_policy="evict_first")
        h = h ^ cur
    tl.store(out_ptr + (tl.program_id(1) * tl.num_programs(0) + pid_n) * BN + tl.arange(0, BN), tl.xor_sum(h, axis=0))


def read(x: torch.Tensor, pw, out: torch.Tensor, level: int, bn: int, split: int, per: int, iters: int,
         asm: bool = True) -> torch.Tensor:
    """Launch ``tc_read_kernel`` on gemm_h2's grid (the words through the L2 256 B hint, as the GEMM's
    nc256 launch); ``out``: int32, 512 per program. Level 0: ``tc_read128_kernel`` (W4)."""
    if level == 0:
        tc_read128_kernel[(pw.out_features // bn, split)](pw.words, out, pw.rows, per, iters, T=pw.tile, BN=bn,
                                                          RPB=16, num_warps=4)
        return out
    tc_read_kernel[(pw.out_features // bn, split)](
        x, pw.words, pw.scale, pw.zero, out, x.shape[0], pw.out_features, pw.in_features, x.stride(0), pw.rows,
        pw.scale.shape[1], per, iters, BITS=pw.bits, GROUP_ROWS=pw.group_rows, T=pw.tile, BM=16, BN=bn,
        LEVEL=level, ASM=2 if asm else 0, num_warps=4, **({"maxnreg": 128} if asm else {}))
    return out


def main() -> None:
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    sms = sm_count(torch.device("cuda"))
    for k, n in ((8192, 28672), (28672, 8192)):
        x = torch.randn(16, k, device="cuda", generator=gen).half()
        cases = []  # the timers hold each case's function, and so its weights
        for bits in (4, 3):
            pws = [_packed(bits, 128, False, k, n, "cuda", gen) for _ in range(4)]  # 4 copies > the 50 MB L2
            iters = -(-k // 128)
            n_tiles = n // 128
            split, per = _split(n_tiles, iters, None, sms, 4.0, floor=True)
            out = torch.empty(split * n_tiles * 512, dtype=torch.int32, device="cuda")
            cfg = GemmConfig(BM=16, BN=128, h2=True, waves=4, maxnreg=128, evict=2)
            label = f"W{bits} BN128 x4 r128 nc256 ({n_tiles}x{split} programs)"
            # every tensor a graph replays is bound here, not looked up later: the next loop pass rebinds
            # `out`, and a graph holding a freed buffer reads unmapped memory (run 12's bench crash)
            def twin(level, p=pws, o=out, sp=split, pe=per, its=iters):
                return lambda i: read(x, p[i % 4], o, level, 128, sp, pe, its)

            if bits == 4:
                cases.append((f"16 B loads   {label}", twin(0)))
            cases += [(f"words only   {label}", twin(1)), (f"+ x and MMA  {label}", twin(2)),
                      (f"GEMM         {label}", lambda i, p=pws, c=cfg: gemm(x, p[i % 4], cfg=c))]
        print(f"{k} -> {n}, M=16", flush=True)
        for name, us in time_cases(cases):
            print(f"  {name:<56} {us:6.1f} us", flush=True)
        del cases
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
