"""W4A8: dynamic per-token int8 activations x per-channel symmetric int4 (or int8/int2) weights.

The dot runs on int8 tensor cores with int32 accumulation; the activation scale (per row) and
the weight scale (per column) are applied in the epilogue. Activations are quantized either by a
separate one-pass kernel (large M: the GEMM then reads half the bytes of x) or inside the GEMM
(``FUSE``, small M: one launch instead of two; each program recomputes its rows' absmax).

Rounding matches ``kernels.reference.quantize_act_int8``: ``s = absmax / 127`` in fp32,
``q = round_half_even(x / s)`` with IEEE division.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import load_rows, splitk_epilogue

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + c) - c rounds |v| < 2^22 to nearest even


@triton.jit
def _row_scale(x_ptr, offs_m, M, K, stride_xm, BM: tl.constexpr, BK: tl.constexpr):
    """Per-row ``absmax / 127`` (fp32, floored at 1e-8) of rows ``offs_m``."""
    amax = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(xv.to(tl.float32)), axis=1))
    return tl.maximum(amax / 127.0, 1e-8)


@triton.jit
def _quant(xv, s):
    """int8 codes of ``xv`` (fp32) for per-row scales ``s`` [BM, 1]."""
    q = (tl.math.div_rn(xv, s) + _RNE) - _RNE
    return tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)


@triton.jit
def quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, BK: tl.constexpr):
    """One program per row: scale, then codes."""
    row = tl.program_id(0)
    offs_m = row + tl.arange(0, 1)
    s = _row_scale(x_ptr, offs_m, M, K, stride_xm, 1, BK)
    tl.store(s_ptr + offs_m, s)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=kk[None, :] < K, other=0.0)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + kk[None, :], _quant(xv.to(tl.float32), s[:, None]),
                 mask=kk[None, :] < K)


@triton.jit
def w4a8_kernel(
    x_ptr, sx_ptr, words_ptr, sw_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, rows_total, iters_per_split,
    BITS: tl.constexpr, T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, FUSE: tl.constexpr, TRANS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, EVICT: tl.constexpr,
):
    """``x`` is int8 codes with per-row scales ``sx`` (FUSE=False) or 16-bit activations (FUSE=True)."""
    V: tl.constexpr = 32 // BITS
    RB: tl.constexpr = BK // V
    MASK: tl.constexpr = (1 << BITS) - 1
    OFF: tl.constexpr = 1 << (BITS - 1)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n0 = pid_n * BN
    col = (n0 // T) * (rows_total * T) + (n0 % T) + tl.arange(0, BN)
    col = tl.max_contiguous(tl.multiple_of(col, BN), BN)
    sw_col = (n0 // T) * T + (n0 % T) + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    j3 = tl.arange(0, V)[None, None, :]
    if FUSE:
        sx = _row_scale(x_ptr, offs_m, M, K, stride_xm, BM, BK)
    else:
        sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=1.0)

    n_iters = rows_total // RB
    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    if TRANS:
        acc = tl.zeros([BN, BM], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    # the packed words are double-buffered in registers (they feed the dot only after decoding)
    w0n, w1n, w2n = load_rows(words_ptr + (it0 * RB + tl.arange(0, RB))[:, None, None] * T + col[None, :, None],
                              T, BITS, EVICT)
    for it in range(it0, it1):
        w0 = w0n
        nxt = tl.minimum(it + 1, it1 - 1)
        w0n, w1n, w2n = load_rows(words_ptr + (nxt * RB + tl.arange(0, RB))[:, None, None] * T + col[None, :, None],
                                  T, BITS, EVICT)
        kk = it * BK + offs_k
        xmask = (offs_m[:, None] < M) & (kk[None, :] < K)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=xmask, other=0)
        if FUSE:
            xq = _quant(xv.to(tl.float32), sx[:, None])
        else:
            xq = xv
        q = (((w0 >> (j3 * BITS)) & MASK) - OFF).to(tl.int8)  # [RB, BN, V]
        if TRANS:
            wq = tl.reshape(tl.permute(q, (1, 0, 2)), (BN, BK))
            acc = tl.dot(wq, tl.trans(xq), acc, out_dtype=tl.int32)
        else:
            wq = tl.reshape(tl.permute(q, (0, 2, 1)), (BK, BN))
            acc = tl.dot(xq, wq, acc, out_dtype=tl.int32)
    if TRANS:
        acc = tl.trans(acc)
    sw = tl.load(sw_ptr + sw_col).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    splitk_epilogue(y, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr,
                    pid, HAS_BIAS, SPLIT, 0, tl.num_programs(1))
