"""Triton helpers shared by the kernels: build exact floats from packed code bits.

Why floats from bits: converting an integer to a float (I2F) issues at a quarter of the FMA rate
on Hopper and was the limit of a plain Triton GEMV (METHODS.md §7). Instead a field at bit
position p is AND-masked in place and OR-ed into the pattern of 2^23 (one LOP3 when the magic
number sits in a register, which is why it is passed as a runtime argument, not a literal):
the float is ``2^23 + u * 2^p``, and one FMA ``f * 2^-p - 2^(23-p)`` returns ``u`` exactly.
Every per-field quantity below is a compile-time constant per register, because the field
index runs along a dimension held entirely inside one thread.

Everything here is portable Triton (no inline PTX), so it runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _exact_from_field(field, pos, magic, OFFSET: tl.constexpr):
    """``field`` holds ``u << pos`` (pos + bits <= 23): return ``u - OFFSET`` as exact fp32."""
    f = (field | magic).to(tl.float32, bitcast=True)
    inv = ((127 - pos) << 23).to(tl.float32, bitcast=True)  # 2^-pos
    off = ((150 - pos) << 23).to(tl.float32, bitcast=True)  # 2^(23-pos)
    return f * inv - (off + OFFSET)


@triton.jit
def decode_rows(w0, w1, w2, j, magic, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """Decode loaded words into fp32 codes minus OFFSET (exact), broadcasting over ``j``.

    ``w*`` carry a trailing dimension of size 1 and ``j`` (the field index, ``arange(V)``) a
    trailing dimension of size V, so the fields of a word become a broadcast dimension and stay
    in the thread that loaded the word (never build these by ``expand_dims`` of a loaded tensor:
    Triton would then spread the fields over lanes).
    b in {2, 4, 8}: one word per row, V = 32 / b; ``w1``/``w2`` are ignored.
    b = 3: a row is the 3-word chunk (A=w0, B=w1, C=w2) holding 32 values (see layout.py).
    """
    if BITS == 3:
        word = tl.where(j < 10, w0, tl.where(j < 20, w1, w2))
        wsh = tl.where(j < 10, w0 >> 18, tl.where(j < 20, w1 >> 18, w2 >> 18))
        loc = j % 10
        bit = 3 * (loc // 2) + 16 * (loc % 2)  # value 2i at 3i, 2i+1 at 16+3i (layout.py)
        direct = bit <= 19
        src = tl.where(direct, word, wsh)
        pos = tl.where(direct, bit, bit - 18)
        field = src & (7 << pos)
        v30 = ((w0 >> 15) & 1) | ((w1 >> 14) & 2) | ((w2 >> 13) & 4)
        v31 = ((w0 >> 31) & 1) | ((w1 >> 30) & 2) | ((w2 >> 29) & 4)
        field = tl.where(j == 30, v30, tl.where(j == 31, v31, field))
        pos = tl.where(j >= 30, 0, pos)
    else:
        ND: tl.constexpr = 23 // BITS
        # fields [ND, V) are read from w >> SHIFT; landing the first of them at bit BITS rather
        # than 0 keeps every field a single AND-OR (a field at bit 0 of a shifted word becomes a
        # bit-field extract, two more instructions), unless the top field would then pass bit 22
        SHIFT: tl.constexpr = ND * BITS - BITS if ND * BITS - BITS >= 9 else ND * BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        direct = j < ND
        src = tl.where(direct, w0, w0 >> SHIFT)
        pos = tl.where(direct, j * BITS, j * BITS - SHIFT)
        field = src & (MASK << pos)
    return _exact_from_field(field, pos, magic, OFFSET)


@triton.jit
def _ld_nc256(p):
    """Weight words by inline PTX: non-coherent, no L1 allocation, and the L2 asked to fetch the
    whole 256-byte block (sector promotion). Four elements per asm: the four consecutive columns
    a thread holds (the loads' 16-byte vectors), addressed by the first."""
    return tl.inline_asm_elementwise(
        "ld.global.nc.L1::no_allocate.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l,l,l,l",
        [p.to(tl.int64, bitcast=True)], dtype=tl.int32, is_pure=True, pack=4)


@triton.jit
def load_rows(wp, T: tl.constexpr, BITS: tl.constexpr, EVICT: tl.constexpr):
    """Load the word(s) of decode rows; ``wp`` points at the first word of each row. EVICT: 1
    evict-first, 2 by ``_ld_nc256`` (run 12: the W4 fp16-pair GEMV 2-3% faster)."""
    if EVICT == 2:
        w0 = _ld_nc256(wp)
    elif EVICT:
        w0 = tl.load(wp, eviction_policy="evict_first")
    else:
        w0 = tl.load(wp)
    if BITS == 3:
        if EVICT == 2:
            w1 = _ld_nc256(wp + T)
            w2 = _ld_nc256(wp + 2 * T)
        elif EVICT:
            w1 = tl.load(wp + T, eviction_policy="evict_first")
            w2 = tl.load(wp + 2 * T, eviction_policy="evict_first")
        else:
            w1 = tl.load(wp + T)
            w2 = tl.load(wp + 2 * T)
    else:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def store_out(y, offs_m, offs_n, M, N, out_ptr, stride_om, GLU: tl.constexpr):
    """Round ``y`` [BM, BN] to the output dtype and store it; GLU > 0: the columns are gate and up
    in alternating blocks of GLU (``interleave_gate_up``), and what is stored is ``silu(gate) * up``
    at column ``offs_n[0] / 2 + ...`` of an output N / 2 wide (computed as ``silu_mul`` does)."""
    BM: tl.constexpr = y.shape[0]
    BN: tl.constexpr = y.shape[1]
    if GLU:
        yh = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # the projection's own rounding
        y4 = tl.permute(tl.reshape(yh, [BM, BN // (2 * GLU), 2, GLU]), (0, 1, 3, 2))
        g, u = tl.split(y4)  # [BM, BN / (2 GLU), GLU] each
        a = tl.reshape(g / (1.0 + tl.exp(-g)) * u, [BM, BN // 2])
        cols = tl.min(offs_n, axis=0) // 2 + tl.arange(0, BN // 2)
        mask = (offs_m[:, None] < M) & (cols[None, :] < N // 2)
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], a.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def splitk_epilogue(y, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr, cnt_idx,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, GLU: tl.constexpr, expected):
    """Write ``y`` [BM, BN] (fp32 partial sums) to ``out`` (through ``store_out``).

    SPLIT: partials of all k-splits are added into a fp32 workspace with atomics; the program
    that arrives last (per-tile counter) reads the sum back (an atomic add of 0, so it is read where
    the atomics landed), zeroes it, adds the bias, writes the output and resets the counter, so no
    memset or second kernel is needed; ``expected`` programs add into the tile (a stream-K grid
    varies it per tile; one means a plain store). The workspace atomics are relaxed: ordering comes from the
    CTA barrier and the counter's acquire-release atomic (the pattern of CUTLASS's semaphore), and a
    fence per partial (the default acq_rel) was a visible share of a small GEMV's stalls (ncu, run 8).
    """
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT and expected > 1:
        wsp = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(wsp, y, mask=mask, sem="relaxed")
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + cnt_idx, 1)
        if old == expected - 1:
            y = tl.atomic_add(wsp, tl.zeros_like(y), mask=mask, sem="relaxed")  # coherent read at L2
            tl.store(wsp, tl.zeros_like(y), mask=mask)
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            store_out(y, offs_m, offs_n, M, N, out_ptr, stride_om, GLU)
            tl.atomic_xchg(cnt_ptr + cnt_idx, 0)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        store_out(y, offs_m, offs_n, M, N, out_ptr, stride_om, GLU)


@triton.jit
def finish(y, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr, cnt_idx, first,
           HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, GLU: tl.constexpr, ACC: tl.constexpr, expected):
    """A program's partial sums ``y`` [BM, BN] to the output. ACC: added into the zeroed fp32 ``out``
    (relaxed atomics; the bias by the split holding the first k, ``first``), else ``splitk_epilogue``."""
    if ACC:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            y += tl.where(first, bias, 0.0)[None, :]
        tl.atomic_add(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y,
                      mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), sem="relaxed")
    else:
        splitk_epilogue(y, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr,
                        cnt_idx, HAS_BIAS, SPLIT, GLU, expected)
