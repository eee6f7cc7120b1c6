"""fp16-pair GEMV for W4 and W3 with fp16 activations: two weights per instruction.

Why: the portable GEMV (gemv.py) spends ~4.2 (W4) / 4.6 (W3) instructions per weight and holds a
[R, BN, V] fp32 accumulator (128-168 registers, 3-4 programs per SM): on the H100 it stops at
51.5 µs (W4) and 49.7 µs (W3) against byte floors near 42 and 32 µs. Here a ``lop3`` ORs two
fields of a word into the two halves of the fp16 pattern 0x6400 (1024), one ``sub.f16x2`` /
``fma.f16x2`` removes 1024 (and the field offset) and the zero point, exactly (small integers), and
one ``fma.f16x2`` multiplies by a pair of x. The products of one word (8 or 10 weights) are summed
in fp16, converted to fp32 and scaled in fp32 once per word: ~2.1 instructions per weight and one
fp32 register per word.

Numerics: products ``x * (u - z)`` are rounded to fp16 and up to 5 of them summed in fp16 before the
fp32 accumulation (errors well inside the 16-bit output tolerance; the GPU test compares with the
float64 reference). An fp16 partial overflows when ``|x| > 65504 / (4 * 15) = 1091`` (W4) or
``65504 / (6 * 7) = 1559`` (W3: the third word's sum has 6 terms) on every weight of one word: the
dispatcher keeps this path for fp16 activations; bf16 goes to gemv.py. (Summing two or three W3
words in fp16 before converting saved 6% of the instructions and no time, run 12.)

Pairs: W4 keeps the on-disk nibble order (fields j and j+4 share an offset), so x pairs are
permuted in registers once per row; the W3 layout (layout.py) puts values 2i and 2i+1 at the same
offset of both halves, so its x pairs are plain 32-bit words of x.

``ASM=False`` is the portable twin (same pairs, fp16 products and sums in plain Triton): the
interpreter cannot run inline PTX, and the tests check the twin against float64 on CPU and
against the PTX on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import finish, load_rows
from .pdl import grid_sync, launch_dependents, wait_prior


def _dot_asm(n: int) -> str:
    """PTX: fp16-pair dot of ``n`` pairs (operands $1..$n weights, $n+1..$2n x), fp32 out ($0)."""
    lines = ["{", ".reg .b32 a;", ".reg .b16 l, h;", ".reg .f32 f, g;", f"mul.rn.f16x2 a, $1, ${n + 1};"]
    lines += [f"fma.rn.f16x2 a, ${i + 1}, ${n + i + 1}, a;" for i in range(1, n)]
    lines += ["mov.b32 {l, h}, a;", "cvt.f32.f16 f, l;", "cvt.f32.f16 g, h;", "add.f32 $0, f, g;", "}"]
    return "\n".join(lines)


_DOT4: tl.constexpr = tl.constexpr(_dot_asm(4))
_DOT5: tl.constexpr = tl.constexpr(_dot_asm(5))
_DOT6: tl.constexpr = tl.constexpr(_dot_asm(6))

# W4 word -> 4 pairs (u_j - z, u_{j+4} - z), j = 0..3. $4 word, $5 (1024+z) pair, $6 -(64+z) pair.
_DEC4: tl.constexpr = tl.constexpr("""{
.reg .b32 s, k;
lop3.b32 $0, $4, 0x000f000f, 0x64006400, 0xea;
lop3.b32 $1, $4, 0x00f000f0, 0x64006400, 0xea;
shr.u32 s, $4, 8;
lop3.b32 $2, s, 0x000f000f, 0x64006400, 0xea;
lop3.b32 $3, s, 0x00f000f0, 0x64006400, 0xea;
mov.b32 k, 0x2c002c00;
sub.f16x2 $0, $0, $5;
fma.rn.f16x2 $1, $1, k, $6;
sub.f16x2 $2, $2, $5;
fma.rn.f16x2 $3, $3, k, $6;
}""")

# W3 word -> 5 pairs (u_2i - z, u_2i+1 - z). $5 word, $6 (1024+z), $7 -(128+z), $8 -(16+z).
_DEC3: tl.constexpr = tl.constexpr("""{
.reg .b32 s, k8, k64;
lop3.b32 $0, $5, 0x00070007, 0x64006400, 0xea;
lop3.b32 $1, $5, 0x00380038, 0x64006400, 0xea;
lop3.b32 $2, $5, 0x01c001c0, 0x64006400, 0xea;
shr.u32 s, $5, 9;
lop3.b32 $3, s, 0x00070007, 0x64006400, 0xea;
lop3.b32 $4, s, 0x00380038, 0x64006400, 0xea;
mov.b32 k8, 0x30003000;
mov.b32 k64, 0x24002400;
sub.f16x2 $0, $0, $6;
fma.rn.f16x2 $1, $1, k8, $7;
fma.rn.f16x2 $2, $2, k64, $8;
sub.f16x2 $3, $3, $6;
fma.rn.f16x2 $4, $4, k8, $7;
}""")

# W3 values 30/31 of a chunk: bits 15/31 of A, B, C as the pair 1024 + code in t. $1 A, $2 B, $3 C.
_TOP3 = """.reg .b32 a, b, c, t;
shr.u32 a, $1, 15;
shr.u32 b, $2, 14;
shr.u32 c, $3, 13;
lop3.b32 t, a, 0x00010001, 0x64006400, 0xea;
lop3.b32 t, b, 0x00020002, t, 0xea;
lop3.b32 t, c, 0x00040004, t, 0xea;"""
# ... minus z: $4 (1024+z).
_DEC3_TOP: tl.constexpr = tl.constexpr("{\n" + _TOP3 + "\nsub.f16x2 $0, t, $4;\n}")


@triton.jit
def _h(p, HI: tl.constexpr):
    """Half ``HI`` of an int32 fp16 pair as fp16 (twin only)."""
    if HI:
        b = (p >> 16).to(tl.int16)
    else:
        b = (p & 0xFFFF).to(tl.int16)
    return b.to(tl.float16, bitcast=True)


@triton.jit
def _bits(v):
    """fp16 -> its 16 bits in the low half of an int32."""
    return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _pair(lo, hi):
    """Two fp16 tensors -> int32 pair (lo in bits 0-15)."""
    return _bits(lo) | (_bits(hi) << 16)


@triton.jit
def _neg_pair(zf, c: tl.constexpr):
    """Pair of fp16 ``-(c + z)`` (exact: small integers) from fp32 ``z``."""
    h = _bits((-(zf + c)).to(tl.float16))
    return h | (h << 16)


@triton.jit
def _uz(w, pos: tl.constexpr, BITS: tl.constexpr, zf):
    """Twin: fp16 ``u - z`` of the field at bit ``pos`` (exact)."""
    return (((w >> pos) & ((1 << BITS) - 1)).to(tl.float32) - zf).to(tl.float16)


@triton.jit
def _dot(t0, t1, t2, t3, t4, t5, x0, x1, x2, x3, x4, x5, N: tl.constexpr, ASM: tl.constexpr):
    """fp32 sum over N fp16 pairs of ``t * x`` (products and the N-term sums in fp16)."""
    if ASM:
        if N == 4:
            r = tl.inline_asm_elementwise(_DOT4, "=f,r,r,r,r,r,r,r,r", [t0, t1, t2, t3, x0, x1, x2, x3],
                                          dtype=tl.float32, is_pure=True, pack=1)
        elif N == 5:
            r = tl.inline_asm_elementwise(_DOT5, "=f,r,r,r,r,r,r,r,r,r,r", [t0, t1, t2, t3, t4, x0, x1, x2, x3, x4],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise(_DOT6, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                                          [t0, t1, t2, t3, t4, t5, x0, x1, x2, x3, x4, x5],
                                          dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo = _h(t0, False) * _h(x0, False)
        hi = _h(t0, True) * _h(x0, True)
        lo += _h(t1, False) * _h(x1, False)
        hi += _h(t1, True) * _h(x1, True)
        lo += _h(t2, False) * _h(x2, False)
        hi += _h(t2, True) * _h(x2, True)
        lo += _h(t3, False) * _h(x3, False)
        hi += _h(t3, True) * _h(x3, True)
        if N >= 5:
            lo += _h(t4, False) * _h(x4, False)
            hi += _h(t4, True) * _h(x4, True)
        if N >= 6:
            lo += _h(t5, False) * _h(x5, False)
            hi += _h(t5, True) * _h(x5, True)
        r = lo.to(tl.float32) + hi.to(tl.float32)
    return r


@triton.jit
def _dec4(w, za, zb, zf, ASM: tl.constexpr):
    """W4 word -> pairs (u_j - z, u_{j+4} - z), j = 0..3."""
    if ASM:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(_DEC4, "=r,=r,=r,=r,r,r,r", [w, za, zb],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                                   is_pure=True, pack=1)
    else:
        t0 = _pair(_uz(w, 0, 4, zf), _uz(w, 16, 4, zf))
        t1 = _pair(_uz(w, 4, 4, zf), _uz(w, 20, 4, zf))
        t2 = _pair(_uz(w, 8, 4, zf), _uz(w, 24, 4, zf))
        t3 = _pair(_uz(w, 12, 4, zf), _uz(w, 28, 4, zf))
    return t0, t1, t2, t3


@triton.jit
def _dec3(w, za, z8, z64, zf, ASM: tl.constexpr):
    """W3 word -> pairs (u_2i - z, u_2i+1 - z), i = 0..4."""
    if ASM:
        t0, t1, t2, t3, t4 = tl.inline_asm_elementwise(
            _DEC3, "=r,=r,=r,=r,=r,r,r,r,r", [w, za, z8, z64],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        t0 = _pair(_uz(w, 0, 3, zf), _uz(w, 16, 3, zf))
        t1 = _pair(_uz(w, 3, 3, zf), _uz(w, 19, 3, zf))
        t2 = _pair(_uz(w, 6, 3, zf), _uz(w, 22, 3, zf))
        t3 = _pair(_uz(w, 9, 3, zf), _uz(w, 25, 3, zf))
        t4 = _pair(_uz(w, 12, 3, zf), _uz(w, 28, 3, zf))
    return t0, t1, t2, t3, t4


@triton.jit
def _dec3_top(a, b, c, za, zf, ASM: tl.constexpr):
    """W3 values 30/31 of a chunk (bits 15 and 31 of its three words) as a pair minus z."""
    if ASM:
        t = tl.inline_asm_elementwise(_DEC3_TOP, "=r,r,r,r,r", [a, b, c, za], dtype=tl.int32, is_pure=True, pack=1)
    else:
        v30 = ((a >> 15) & 1) | ((b >> 14) & 2) | ((c >> 13) & 4)
        v31 = ((a >> 31) & 1) | ((b >> 30) & 2) | ((c >> 29) & 4)
        t = _pair((v30.to(tl.float32) - zf).to(tl.float16), (v31.to(tl.float32) - zf).to(tl.float16))
    return t


@triton.jit
def _lo(q):
    return q.to(tl.int32)


@triton.jit
def _hi(q):
    return (q >> 32).to(tl.int32)


@triton.jit
def _csub(za, C: tl.constexpr, ASM: tl.constexpr):
    """fp16 pair ``C - za`` (C an fp16 pair bit pattern): ``-(c + z)`` from ``za = 1024 + z``."""
    if ASM:
        r = tl.inline_asm_elementwise("{\n.reg .b32 c;\nmov.b32 c, " + C + ";\nsub.f16x2 $0, c, $1;\n}",
                                      "=r,r", [za], dtype=tl.int32, is_pure=True, pack=1)
    else:
        c = _h(tl.full(za.shape, 0, tl.int32) | tl.constexpr(int(C, 16) & 0xFFFF), False).to(tl.float32)
        h = _bits((c - _h(za, False).to(tl.float32)).to(tl.float16))
        r = h | (h << 16)
    return r


@triton.jit
def _zconst(z, OFFSET: tl.constexpr, SYM: tl.constexpr, BITS: tl.constexpr, like, ASM: tl.constexpr):
    """Per-column zero terms: fp32 z (twin), the (1024+z) pair and the -(c+z) pairs of the shifted
    fields, by integer ops and one fp16-pair subtraction each (exact)."""
    if SYM:
        zi = tl.full(like.shape, OFFSET, tl.int32)
    else:
        zi = z.to(tl.int32)
    zf = zi.to(tl.float32)
    za = 0x64006400 | zi | (zi << 16)
    if BITS == 4:
        zb = _csub(za, "0x63806380", ASM)  # 960 - (1024 + z) = -(64 + z)
        zc = zb
    else:
        zb = _csub(za, "0x63006300", ASM)  # 896: -(128 + z)
        zc = _csub(za, "0x63e063e0", ASM)  # 1008: -(16 + z)
    return zf, za, zb, zc


@triton.jit
def _row_dot(w0, w1, w2, q0, q1, q2, q3, q4, q5, q6, q7, zf, za, zb, zc, BITS: tl.constexpr, ASM: tl.constexpr):
    """fp32 ``sum_k x_k (u_k - z)`` of one decode row per element; ``q*``: x as int64 (4 values each)."""
    if BITS == 4:
        p0, p1, p2, p3 = _lo(q0), _hi(q0), _lo(q1), _hi(q1)  # (x0,x1) (x2,x3) (x4,x5) (x6,x7)
        x0 = (p0 & 0xFFFF) | (p2 << 16)  # (x0, x4)
        x1 = ((p0 >> 16) & 0xFFFF) | (p2 & -65536)  # (x1, x5)
        x2 = (p1 & 0xFFFF) | (p3 << 16)
        x3 = ((p1 >> 16) & 0xFFFF) | (p3 & -65536)
        t0, t1, t2, t3 = _dec4(w0, za, zb, zf, ASM)
        r = _dot(t0, t1, t2, t3, t0, t0, x0, x1, x2, x3, x0, x0, 4, ASM)
    else:
        a0, a1, a2, a3, a4 = _dec3(w0, za, zb, zc, zf, ASM)
        r = _dot(a0, a1, a2, a3, a4, a4, _lo(q0), _hi(q0), _lo(q1), _hi(q1), _lo(q2), _lo(q2), 5, ASM)
        b0, b1, b2, b3, b4 = _dec3(w1, za, zb, zc, zf, ASM)
        r += _dot(b0, b1, b2, b3, b4, b4, _hi(q2), _lo(q3), _hi(q3), _lo(q4), _hi(q4), _hi(q4), 5, ASM)
        c0, c1, c2, c3, c4 = _dec3(w2, za, zb, zc, zf, ASM)
        c5 = _dec3_top(w0, w1, w2, za, zf, ASM)
        r += _dot(c0, c1, c2, c3, c4, c5, _lo(q5), _hi(q5), _lo(q6), _hi(q6), _lo(q7), _hi(q7), 6, ASM)
    return r


@triton.jit
def _ld(p, mask, safe, i: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, NC: tl.constexpr):
    """One int64 of x per element. ASM: by inline PTX, so the load keeps the layout of its address
    (the words' layout; triton 3.6 re-lays ``tl.load`` of a stride-0 pointer and converts it
    back through shared memory every iteration) and, being pure, the copies along BN merge.
    NC: through the read-only (non-coherent) path -- not under PDL, where the kernel is already
    running while the previous grid writes x."""
    if ASM:
        if EVEN:
            a = (p + i).to(tl.int64, bitcast=True)
        else:
            a = tl.where(mask, p + i, safe).to(tl.int64, bitcast=True)
        if NC:
            v = tl.inline_asm_elementwise("ld.global.nc.b64 $0, [$1];", "=l,l", [a], dtype=tl.int64,
                                          is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise("ld.global.b64 $0, [$1];", "=l,l", [a], dtype=tl.int64,
                                          is_pure=True, pack=1)
        if not EVEN:
            v = tl.where(mask, v, 0)
    elif EVEN:
        v = tl.load(p + i)
    else:
        v = tl.load(p + i, mask=mask, other=0)
    return v


@triton.jit
def _load_x(xp, x_ptr, qi, M, K4, m3, QPR: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr,
            NC: tl.constexpr = True):
    """The x words of a row block: QPR int64 (4 fp16 each) per decode row, [BM, R, 1] each."""
    q0 = _ld(xp, (m3 < M) & (qi < K4), x_ptr, 0, EVEN, ASM, NC)
    q1 = _ld(xp, (m3 < M) & (qi + 1 < K4), x_ptr, 1, EVEN, ASM, NC)
    if QPR == 8:
        q2 = _ld(xp, (m3 < M) & (qi + 2 < K4), x_ptr, 2, EVEN, ASM, NC)
        q3 = _ld(xp, (m3 < M) & (qi + 3 < K4), x_ptr, 3, EVEN, ASM, NC)
        q4 = _ld(xp, (m3 < M) & (qi + 4 < K4), x_ptr, 4, EVEN, ASM, NC)
        q5 = _ld(xp, (m3 < M) & (qi + 5 < K4), x_ptr, 5, EVEN, ASM, NC)
        q6 = _ld(xp, (m3 < M) & (qi + 6 < K4), x_ptr, 6, EVEN, ASM, NC)
        q7 = _ld(xp, (m3 < M) & (qi + 7 < K4), x_ptr, 7, EVEN, ASM, NC)
    else:
        q2, q3, q4, q5, q6, q7 = q0, q0, q0, q0, q0, q0
    return q0, q1, q2, q3, q4, q5, q6, q7


@triton.jit
def _stage_w(j, wbase, szbase, scale_ptr, zero_ptr, BITS: tl.constexpr, SYM: tl.constexpr,
             PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr, T: tl.constexpr, R: tl.constexpr,
             EVICT: tl.constexpr):
    """The weight-side loads of iteration ``j``: words and (grouped) scale and zero."""
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    w0, w1, w2 = load_rows(wbase + j * (R * WPR * T), T, BITS, EVICT)
    if PER_CHANNEL:
        s = w0
        z = w0
    else:
        g = ((j * R) // GROUP_ROWS) * T  # R divides GROUP_ROWS, or is a multiple of it (szbase)
        s = tl.load(scale_ptr + szbase + g)
        z = s
        if not SYM:
            z = tl.load(zero_ptr + szbase + g)
    return w0, w1, w2, s, z


@triton.jit
def _stage(j, wbase, xbase, qi0, szbase, x_ptr, scale_ptr, zero_ptr, M, K4, m3,
           BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr,
           T: tl.constexpr, R: tl.constexpr, EVICT: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr,
           NC: tl.constexpr = True):
    """Issue the loads of iteration ``j``: words, x, and (grouped) scale and zero."""
    QPR: tl.constexpr = 8 if BITS == 3 else 2
    w0, w1, w2, s, z = _stage_w(j, wbase, szbase, scale_ptr, zero_ptr, BITS, SYM, PER_CHANNEL, GROUP_ROWS, T, R,
                                EVICT)
    q0, q1, q2, q3, q4, q5, q6, q7 = _load_x(xbase + j * (R * QPR), x_ptr, qi0 + j * (R * QPR), M, K4, m3,
                                             QPR, EVEN, ASM, NC)
    return w0, w1, w2, q0, q1, q2, q3, q4, q5, q6, q7, s, z


@triton.jit
def _segment(pid_n, pid_m, it0, it1, expected, cnt_idx,
             x_ptr, words_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
             M, N, K4, stride_xm, stride_om, rows_total, groups_pad,
             BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr,
             T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr,
             HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVICT: tl.constexpr, EVEN: tl.constexpr,
             ASM: tl.constexpr, DEPTH: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr, ACC: tl.constexpr,
             FIRST: tl.constexpr, LAST: tl.constexpr, XAHEAD: tl.constexpr):
    """Iterations [it0, it1) of column tile ``pid_n`` and row block ``pid_m``, then the epilogue
    (``expected`` programs add into tile ``cnt_idx``; one: a plain store)."""
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    QPR: tl.constexpr = 8 if BITS == 3 else 2  # int64 words of x per decode row
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SYM else 0
    offs_n = pid_n * BN + tl.arange(0, BN)
    n0 = pid_n * BN  # BN divides T
    col = (n0 // T) * (rows_total * WPR * T) + (n0 % T) + tl.arange(0, BN)
    col = tl.max_contiguous(tl.multiple_of(col, BN), BN)
    sz_col = (n0 // T) * (groups_pad * T) + (n0 % T) + tl.arange(0, BN)
    sz_col = tl.max_contiguous(tl.multiple_of(sz_col, BN), BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    r_loc = tl.arange(0, R)
    m3 = offs_m[:, None, None]

    wbase = words_ptr + (r_loc * WPR)[None, :, None] * T + col[None, None, :]
    # x is read by inline PTX on [BM, R, 1] addresses (see _ld): no tl.load, so no layout of its own
    qi0 = r_loc[None, :, None] * QPR
    xbase = x_ptr + m3 * stride_xm + qi0
    # scale/zero pointers [1, R, BN] (stride 0 along R inside a group, merged loads): no layout convert either
    if R > GROUP_ROWS:  # an iteration spans R / GROUP_ROWS whole groups
        szbase = sz_col[None, None, :] + ((r_loc // GROUP_ROWS) * T)[None, :, None]
    else:
        szbase = sz_col[None, None, :] + 0 * r_loc[None, :, None]
    if PER_CHANNEL:
        zsrc = szbase  # any int tensor of the right shape when symmetric
        if not SYM:
            zsrc = tl.load(zero_ptr + szbase)
        zf, za, zb, zc = _zconst(zsrc, OFFSET, SYM, BITS, zsrc, ASM)
    a0, a1, a2, a_s, a_z = _stage_w(it0, wbase, szbase, scale_ptr, zero_ptr, BITS, SYM, PER_CHANNEL, GROUP_ROWS,
                                    T, R, EVICT)
    j1 = tl.minimum(it0 + 1, it1 - 1)  # the second iteration (the first again for a one-iteration program)
    if DEPTH == 2:  # its weights before the wait too: a decode GEMV whose programs run two or three
        # iterations then has most of its bytes in flight while the glue kernel before it runs
        b0, b1, b2, b_s, b_z = _stage_w(j1, wbase, szbase, scale_ptr, zero_ptr, BITS, SYM, PER_CHANNEL, GROUP_ROWS,
                                        T, R, EVICT)
    if PDL == 2 and FIRST:
        launch_dependents()
    if PDL == 1 or PDL == 2:  # everything above reads weights only; x and the outputs belong to the previous grid
        xbase = xbase + wait_prior()
    elif PDL == 3:  # inside one persistent launch: x is written by an earlier phase of it (grid_sync)
        xbase = xbase + grid_sync(cnt_ptr, tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2))
    if XAHEAD:
        aq0, aq1, aq2, aq3, aq4, aq5, aq6, aq7 = _load_x(xbase + it0 * (R * QPR), x_ptr, qi0 + it0 * (R * QPR), M,
                                                         K4, m3, QPR, EVEN, ASM, PDL == 0)
    if DEPTH == 2:
        bq0, bq1, bq2, bq3, bq4, bq5, bq6, bq7 = _load_x(xbase + j1 * (R * QPR), x_ptr, qi0 + j1 * (R * QPR), M, K4,
                                                         m3, QPR, EVEN, ASM, PDL == 0)
    y3 = tl.zeros([BM, R, BN], dtype=tl.float32)
    for it in range(it0, it1):
        w0, w1, w2, s, z = a0, a1, a2, a_s, a_z
        if XAHEAD:
            q0, q1, q2, q3, q4, q5, q6, q7 = aq0, aq1, aq2, aq3, aq4, aq5, aq6, aq7
        # the last iterations re-read their own tile: harmless
        if DEPTH == 2:
            a0, a1, a2, aq0, aq1, aq2, aq3, aq4, aq5, aq6, aq7, a_s, a_z = (b0, b1, b2, bq0, bq1, bq2, bq3, bq4,
                                                                            bq5, bq6, bq7, b_s, b_z)
            b0, b1, b2, bq0, bq1, bq2, bq3, bq4, bq5, bq6, bq7, b_s, b_z = _stage(
                tl.minimum(it + 2, it1 - 1), wbase, xbase, qi0, szbase, x_ptr, scale_ptr, zero_ptr, M, K4, m3,
                BITS, SYM, PER_CHANNEL, GROUP_ROWS, T, R, EVICT, EVEN, ASM, PDL == 0)
        elif XAHEAD:
            a0, a1, a2, aq0, aq1, aq2, aq3, aq4, aq5, aq6, aq7, a_s, a_z = _stage(
                tl.minimum(it + 1, it1 - 1), wbase, xbase, qi0, szbase, x_ptr, scale_ptr, zero_ptr, M, K4, m3,
                BITS, SYM, PER_CHANNEL, GROUP_ROWS, T, R, EVICT, EVEN, ASM, PDL == 0)
        else:  # only the words ahead; x (L1-resident, read by every program) where it is used
            a0, a1, a2, a_s, a_z = _stage_w(tl.minimum(it + 1, it1 - 1), wbase, szbase, scale_ptr, zero_ptr, BITS,
                                            SYM, PER_CHANNEL, GROUP_ROWS, T, R, EVICT)
            q0, q1, q2, q3, q4, q5, q6, q7 = _load_x(xbase + it * (R * QPR), x_ptr, qi0 + it * (R * QPR), M, K4, m3,
                                                     QPR, EVEN, ASM, PDL == 0)
        if not PER_CHANNEL:
            zf, za, zb, zc = _zconst(z, OFFSET, SYM, BITS, z, ASM)
        r = _row_dot(w0, w1, w2, q0, q1, q2, q3, q4, q5, q6, q7, zf, za, zb, zc, BITS, ASM)  # [BM, R, BN]
        if PER_CHANNEL:
            y3 += r
        else:
            y3 += r * s.to(tl.float32)
    if PDL == 1 and LAST:
        launch_dependents()
    y = tl.sum(y3, axis=1)  # [BM, BN]
    if PER_CHANNEL:
        y = y * tl.load(scale_ptr + sz_col).to(tl.float32)[None, :]
    finish(y, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr, cnt_idx, it0 == 0,
           HAS_BIAS, SPLIT, GLU, ACC, expected)


@triton.jit
def gemv_h2_kernel(
    x_ptr, words_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K4, stride_xm, stride_om, rows_total, groups_pad, iters_per_split, n_iters,
    BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr,
    T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVICT: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr,
    DEPTH: tl.constexpr, PDL: tl.constexpr = 0, GLU: tl.constexpr = 0, ACC: tl.constexpr = False,
    STREAMK: tl.constexpr = False, n_tiles=1, XAHEAD: tl.constexpr = True,
):
    """One program: BN columns x one k-split; an iteration is R decode rows (inside one group, or
    whole groups: a wide R with more warps needs fewer k-splits, or none, and so no split-K epilogue).

    ``x_ptr`` is x viewed as int64 (``stride_xm`` in int64 units, ``K4 = K / 4``). One fp32 per
    (row of x, decode row, column) accumulates ``(sum of the row's products) * scale``. The loads
    of iteration ``it + DEPTH`` (1 or 2) are issued before iteration ``it`` is computed: Triton
    pipelines no load that feeds no ``tl.dot``, and a GEMV that waits for each load runs at the
    latency, not the bandwidth, of memory. EVEN: no m or k masks needed.
    PDL (pdl.py, 0 off, 1 late, 2 early): the first iteration's weights are requested before waiting
    for the previous grid, x only after; the next grid may be scheduled once every program has left
    the loop (1) or has requested its first weights (2). Inside a persistent launch (``_segment`` called
    by another kernel, run 15's experiment): 3 waits at ``pdl.grid_sync`` instead, 4 waits for nothing
    (a timing bound); both read x coherently, since an earlier phase of the same launch wrote it.
    GLU > 0: the output is silu(gate) * up of gate/up columns interleaved in blocks of GLU
    (decode.store_out), N / 2 wide. ACC: ``out`` is a
    zeroed fp32 buffer and every k-split adds its partial sums into it (relaxed atomics, bias from
    split 0): no counter, no read-back; the consumer rounds to 16 bits as it reads.
    STREAMK: program p takes units [p * iters_per_split, ...) of the ``n_tiles x n_iters`` (tile,
    iteration) units in order -- as many programs as fit in one wave, each the same work, a tile
    shared by at most a few of them (``expected`` per tile); the launch's grid is (programs, 1, M blocks)."""
    pid_m = tl.program_id(2)
    if STREAMK:
        u = tl.program_id(0) * iters_per_split
        u_end = tl.minimum(u + iters_per_split, n_tiles * n_iters)
        while u < u_end:
            t = u // n_iters
            it0 = u - t * n_iters
            it1 = tl.minimum(n_iters, it0 + (u_end - u))
            expected = ((t + 1) * n_iters - 1) // iters_per_split - (t * n_iters) // iters_per_split + 1
            _segment(t, pid_m, it0, it1, expected, pid_m * n_tiles + t,
                     x_ptr, words_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                     M, N, K4, stride_xm, stride_om, rows_total, groups_pad,
                     BITS, SYM, PER_CHANNEL, GROUP_ROWS, T, BM, BN, R, HAS_BIAS, SPLIT, EVICT, EVEN, ASM, DEPTH,
                     PDL, GLU, ACC, False, False, XAHEAD)
            u += it1 - it0
        if PDL == 1:
            launch_dependents()
    else:
        pid_n = tl.program_id(0)
        it0 = tl.program_id(1) * iters_per_split
        it1 = tl.minimum(it0 + iters_per_split, n_iters)
        _segment(pid_n, pid_m, it0, it1, tl.num_programs(1), pid_m * tl.num_programs(0) + pid_n,
                 x_ptr, words_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K4, stride_xm, stride_om, rows_total, groups_pad,
                 BITS, SYM, PER_CHANNEL, GROUP_ROWS, T, BM, BN, R, HAS_BIAS, SPLIT, EVICT, EVEN, ASM, DEPTH,
                 PDL, GLU, ACC, True, True, XAHEAD)

