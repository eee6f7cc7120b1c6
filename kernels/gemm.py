"""Weight-only GEMM: dequantize a [BK, BN] tile in registers, then ``tl.dot`` (tensor cores).

Used for M above the GEMV range. With ``BM = 16`` and split-K it is also the "skinny" path
(M up to ~64), where CUDA-core FMAs would cost M instructions per weight.
Grouped scales are applied to the tile in fp32 before the cast (``(u - z) * s`` is exact in fp32,
so the tile equals the reference's 16-bit weight); per-channel scales are applied after the dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import decode_rows, load_rows, splitk_epilogue


@triton.jit
def tile_loads(words_ptr, scale_ptr, zero_ptr, it, col, sz_col, BITS: tl.constexpr, SYM: tl.constexpr,
               PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr, T: tl.constexpr, BK: tl.constexpr,
               EVICT: tl.constexpr):
    """The words (and grouped scale/zero) of k-block ``it``: issued one iteration ahead."""
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    V: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    RB: tl.constexpr = BK // V
    rows = it * RB + tl.arange(0, RB)
    wp = words_ptr + (rows * WPR)[:, None, None] * T + col[None, :, None]  # [RB, BN, 1]
    w0, w1, w2 = load_rows(wp, T, BITS, EVICT)
    if PER_CHANNEL:
        s = tl.zeros([1, 1, 1], dtype=tl.float32)
        z = s
    elif RB > GROUP_ROWS:
        sp = sz_col[None, :] + (rows // GROUP_ROWS)[:, None] * T
        s = tl.load(scale_ptr + sp).to(tl.float32)[:, :, None]
        z = s if SYM else tl.load(zero_ptr + sp).to(tl.float32)[:, :, None]
    else:
        sp = sz_col + ((it * RB) // GROUP_ROWS) * T
        s = tl.load(scale_ptr + sp).to(tl.float32)[None, :, None]
        z = s if SYM else tl.load(zero_ptr + sp).to(tl.float32)[None, :, None]
    return w0, w1, w2, s, z


@triton.jit
def tile_dequant(w0, w1, w2, s, z, zc, magic, BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 BK: tl.constexpr, BN: tl.constexpr, DTYPE: tl.constexpr, TRANS: tl.constexpr):
    """``[BK, BN]`` tile (``[BN, BK]`` when TRANS) of DTYPE from loaded words. ``zc``: per-channel zero."""
    V: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SYM else 0
    j3 = tl.arange(0, V)[None, None, :]
    u = decode_rows(w0, w1, w2, j3, magic, BITS, OFFSET)  # [RB, BN, V]
    if PER_CHANNEL:
        if not SYM:  # keep (u - z) exact; the scale is applied after the dot
            u -= zc
    elif SYM:
        u = u * s
    else:
        u = u * s - z * s  # (u - z) * s as one FMA
    if TRANS:  # [BN, RB, V] -> [BN, BK]: the tile as the A operand of out^T = W x^T
        w = tl.reshape(tl.permute(u, (1, 0, 2)), (BN, BK))
    else:
        w = tl.reshape(tl.permute(u, (0, 2, 1)), (BK, BN))
    return w.to(DTYPE)


@triton.jit
def gemm_kernel(
    x_ptr, words_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, rows_total, groups_pad, iters_per_split, magic,
    BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr,
    T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVICT: tl.constexpr, TRANS: tl.constexpr,
    DOT_F32: tl.constexpr = False,
):
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    V: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    RB: tl.constexpr = BK // V
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # grouped ordering: GROUP_M row-blocks share each weight tile while it is in L2
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n0 = pid_n * BN  # BN divides T: the columns are contiguous inside one tile
    col = (n0 // T) * (rows_total * WPR * T) + (n0 % T) + tl.arange(0, BN)
    col = tl.max_contiguous(tl.multiple_of(col, BN), BN)
    sz_col = (n0 // T) * (groups_pad * T) + (n0 % T) + tl.arange(0, BN)
    sz_col = tl.max_contiguous(tl.multiple_of(sz_col, BN), BN)
    offs_k = tl.arange(0, BK)
    # the CPU interpreter mangles fp32 -> bf16 casts feeding tl.dot; there (only) the dot runs in fp32
    DTYPE: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty

    n_iters = rows_total // RB
    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    zc = tl.zeros([1, 1, 1], dtype=tl.float32)
    if PER_CHANNEL:
        if not SYM:
            zc = tl.load(zero_ptr + sz_col).to(tl.float32)[None, :, None]
    if TRANS:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    # register double-buffering of the packed tile: Triton pipelines only loads that feed tl.dot
    # directly, and these go through the dequantization first
    w0n, w1n, w2n, sn, zn = tile_loads(words_ptr, scale_ptr, zero_ptr, it0, col, sz_col, BITS, SYM, PER_CHANNEL,
                                       GROUP_ROWS, T, BK, EVICT)
    for it in range(it0, it1):
        w0, w1, w2, s, z = w0n, w1n, w2n, sn, zn
        w0n, w1n, w2n, sn, zn = tile_loads(words_ptr, scale_ptr, zero_ptr, tl.minimum(it + 1, it1 - 1), col, sz_col,
                                           BITS, SYM, PER_CHANNEL, GROUP_ROWS, T, BK, EVICT)
        kk = it * BK + offs_k
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0).to(DTYPE)
        wt = tile_dequant(w0, w1, w2, s, z, zc, magic, BITS, SYM, PER_CHANNEL, BK, BN, DTYPE, TRANS)
        if TRANS:  # weights on the M side of the MMA: small M fills the N side
            acc = tl.dot(wt, tl.trans(xa), acc)
        else:
            acc = tl.dot(xa, wt, acc)
    if TRANS:
        acc = tl.trans(acc)
    if PER_CHANNEL:
        acc *= tl.load(scale_ptr + sz_col).to(tl.float32)[None, :]
    splitk_epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr,
                    pid, HAS_BIAS, SPLIT, 0, tl.num_programs(1))


@triton.jit
def dequant_kernel(words_ptr, scale_ptr, zero_ptr, w_ptr, N, K, rows_total, groups_pad, magic,
                   BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr,
                   T: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Unpack a [BN, BK] block to 16-bit ``W[n, k] = (u - z) * s`` (for large M: then cuBLAS)."""
    pid_n = tl.program_id(0)
    it = tl.program_id(1)
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    offs_n = pid_n * BN + tl.arange(0, BN)
    n0 = pid_n * BN
    col = tl.max_contiguous(tl.multiple_of((n0 // T) * (rows_total * WPR * T) + (n0 % T) + tl.arange(0, BN), BN), BN)
    sz_col = (n0 // T) * (groups_pad * T) + (n0 % T) + tl.arange(0, BN)
    w0, w1, w2, s, z = tile_loads(words_ptr, scale_ptr, zero_ptr, it, col, sz_col, BITS, SYM, False,
                                  GROUP_ROWS, T, BK, False)
    zc = tl.zeros([1, 1, 1], dtype=tl.float32)
    w = tile_dequant(w0, w1, w2, s, z, zc, magic, BITS, SYM, False, BK, BN, tl.float32, True)  # [BN, BK]
    kk = it * BK + tl.arange(0, BK)
    tl.store(w_ptr + offs_n[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (kk[None, :] < K))
