"""Weight-only GEMV for small M (decode): CUDA-core FMAs, ``tl.sum``, split-K.

Per weight the hot loop is one LOP3 (field into the 2^23 pattern), one FMA (the exact code) and
one FMA (times x, fp32 accumulation): 4.4 thread-instructions per weight in the sm_90 SASS with
everything else. The zero point is factored out through the sum of x
(``sum_k x_k (u_k - z) = sum_k x_k u_k - z * sum_k x_k``) and the group scale multiplies the
per-row partial sums, so neither costs a per-weight instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import decode_rows, load_rows, splitk_epilogue


@triton.jit
def _load_x(xp, xmask, EVEN: tl.constexpr):
    if EVEN:
        xv = tl.load(xp)
    else:
        xv = tl.load(xp, mask=xmask, other=0.0)
    return xv


@triton.jit
def gemv_kernel(
    x_ptr, words_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, rows_total, groups_pad, iters_per_split, n_iters, magic,
    BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr,
    T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVICT: tl.constexpr, EVEN: tl.constexpr,
):
    """One program: BN columns x one k-split; an iteration is R decode rows (one group when grouped).

    Products go into a [BM, R, BN, V] FMA chain; the V-sum, zero and scale are applied once per
    group. The next iteration's words, x, scale and zero are loaded before this one is computed
    (register double-buffering): Triton does not pipeline loads that feed no ``tl.dot``, and a
    GEMV that waits for each load runs at the latency, not the bandwidth, of memory.
    EVEN: every x element the program reads exists (no k or m masks)."""
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    V: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SYM else 0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BN + tl.arange(0, BN)
    # BN divides T: a program's columns are contiguous inside one tile
    n0 = pid_n * BN
    col = (n0 // T) * (rows_total * WPR * T) + (n0 % T) + tl.arange(0, BN)
    col = tl.max_contiguous(tl.multiple_of(col, BN), BN)
    sz_col = (n0 // T) * (groups_pad * T) + (n0 % T) + tl.arange(0, BN)
    sz_col = tl.max_contiguous(tl.multiple_of(sz_col, BN), BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    r_loc = tl.arange(0, R)
    j4 = tl.arange(0, V)[None, None, None, :]  # field index: a broadcast, in-thread dimension
    m3 = offs_m[:, None, None]
    kk0 = r_loc[None, :, None] * V + tl.arange(0, V)[None, None, :]  # [1, R, V]

    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    row0 = it0 * R
    wp = words_ptr + ((row0 + r_loc) * WPR)[None, :, None, None] * T + col[None, None, :, None]
    xp = x_ptr + m3 * stride_xm + row0 * V + kk0
    xmask = (m3 < M) & (row0 * V + kk0 < K)
    sp = scale_ptr + sz_col + ((it0 * R) // GROUP_ROWS) * T  # R divides GROUP_ROWS
    zp = zero_ptr + sz_col + ((it0 * R) // GROUP_ROWS) * T
    # prologue: the first iteration's operands
    w0n, w1n, w2n = load_rows(wp, T, BITS, EVICT)
    xn = _load_x(xp, xmask, EVEN)
    if not PER_CHANNEL:
        sn = tl.load(sp)
        if not SYM:
            zn = tl.load(zp)
    y3 = tl.zeros([BM, R, BN], dtype=tl.float32)
    xs = tl.zeros([BM, R, 1], dtype=tl.float32)
    for it in range(it0, it1):
        w0, w1, w2, xv = w0n, w1n, w2n, xn
        if not PER_CHANNEL:
            s = sn
            if not SYM:
                z = zn
        # issue the next iteration's loads now (the last one re-reads this tile: harmless)
        nxt = tl.minimum(it + 1, it1 - 1) - it
        wp += nxt * (R * WPR * T)
        xp += nxt * (R * V)
        if PER_CHANNEL:
            xmask = (m3 < M) & ((row0 + (it + nxt - it0) * R) * V + kk0 < K)
        w0n, w1n, w2n = load_rows(wp, T, BITS, EVICT)
        xn = _load_x(xp, xmask, EVEN)
        if not PER_CHANNEL:
            gstep = (((it + nxt) * R) // GROUP_ROWS - (it * R) // GROUP_ROWS) * T
            sp += gstep
            sn = tl.load(sp)
            if not SYM:
                zp += gstep
                zn = tl.load(zp)

        u = decode_rows(w0, w1, w2, j4, magic, BITS, OFFSET)  # [1, R, BN, V]
        x4 = xv.to(tl.float32)[:, :, None, :]  # [BM, R, 1, V]
        if PER_CHANNEL:
            # no group boundary: reduce each chunk at once (a [BM, R, BN, V] accumulator would
            # cost V times the registers, which spills for b = 3)
            y3 += tl.sum(x4 * u, axis=3)
            if not SYM:
                xs += tl.sum(x4, axis=3)
        else:
            part = tl.sum(x4 * u, axis=3)  # [BM, R, BN]
            if not SYM:
                part -= tl.sum(x4, axis=3) * z.to(tl.float32)[None, None, :]
            y3 += part * s.to(tl.float32)[None, None, :]
    if PER_CHANNEL:
        if not SYM:
            y3 -= xs * tl.load(zero_ptr + sz_col).to(tl.float32)[None, None, :]
        y = tl.sum(y3, axis=1) * tl.load(scale_ptr + sz_col).to(tl.float32)[None, :]
    else:
        y = tl.sum(y3, axis=1)  # [BM, BN]
    splitk_epilogue(y, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr,
                    pid_m * tl.num_programs(0) + pid_n, HAS_BIAS, SPLIT, 0, tl.num_programs(1))
