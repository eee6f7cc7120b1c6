"""Tensor-core GEMM for small M with fp16 activations: the fp16-pair decode of gemv_h2.py feeding the
MMA's A operand from registers, the tile built in the order the MMA fragments hold it.

Why: the tile decode of gemm.py builds fp32 values (FFMA), scales them in fp32 and converts
(F2FP): 5.8 thread-instructions per weight at BN128 (sm_90 SASS), and Triton lays the tile out so
that four lanes load and decode each word for the two values each of them needs. At M=16 that made
the 8192 -> 28672 product 93-106 µs against a byte floor of 41 (NOTES.md, runs 5-8). Here a word
(W4) or 3-word chunk (W3) is loaded once, by the lane whose fragment holds all of its values: a
``lop3`` builds two fp16 codes at once, one ``sub``/``fma.f16x2`` removes the zero point (exact), one
``mul.f16x2`` applies the scale (the product is exact before its single rounding, so the tile equals
the reference's 16-bit weight), and the pair is already the 32-bit register an MMA fragment holds.

Fragment order. In the A operand of ``mma.m16n8k16`` / ``wgmma`` (from registers) lane ``l`` holds,
of each 16-row slice, rows ``l/4`` and ``l/4 + 8``, and of each 16-wide k step the pairs
``(2c, 2c+1)`` and ``(2c+8, 2c+9)``, ``c = l % 4``. A sum over k does not depend on the order of k,
so the tile is not in natural order: the ``vk``-th column of a 32-column slab is
``vk = 16 s + 8 h + 2 c + b`` (pair ``j = 2 s + h`` of a lane's word, half ``b``), and for W3 a lane's
chunk spans four slabs (pair ``p = 4 s' + 2 s + h``). x is permuted the same way in registers.
W4 pair ``j`` is the nibbles ``(j, j + 4)`` of word ``c`` (natural ``k = 8 c + j + 4 b``); W3 pair
``p`` is values ``(2p, 2p + 1)`` of chunk ``c`` (``k = 32 c + 2 p + b``, layout.py).

``ASM=False`` is the portable twin (the same pairs in plain Triton), for the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import finish, load_rows
from .gemv_h2 import _TOP3, _bits, _dec3, _dec3_top, _dec4, _h, _pair, _zconst

BK_H2: tl.constexpr = tl.constexpr(128)  # a W3 chunk per lane of a quad: 4 x 32 values


@triton.jit
def _scale(t, s2, ASM: tl.constexpr):
    """fp16 pair ``t * s`` (``s2``: the scale in both halves), rounded once."""
    if ASM:
        r = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [t, s2], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        r = _pair(_h(t, False) * _h(s2, False), _h(t, True) * _h(s2, True))
    return r


def _raw_asm(n: int, mask: str, step: int) -> str:
    """PTX: a word ($n) -> n fp16 pairs 1024 + the field at bits (step * i, 16 + step * i), i < n."""
    lines = ["{", ".reg .b32 s;", f"lop3.b32 $0, ${n}, {mask}, 0x64006400, 0xea;"]
    for i in range(1, n):
        lines += [f"shr.u32 s, ${n}, {step * i};", f"lop3.b32 ${i}, s, {mask}, 0x64006400, 0xea;"]
    return "\n".join(lines + ["}"])


# 1024 + code as fp16 pairs, nothing subtracted or scaled (scale and zero point after the dot):
# W4 word -> pairs (u_j, u_{j+4}), j = 0..3; W3 word -> pairs (u_2i, u_2i+1), i = 0..4; W3 values 30/31
# of a chunk from bits 15/31 of its three words ($1 A, $2 B, $3 C).
_RAW4: tl.constexpr = tl.constexpr(_raw_asm(4, "0x000f000f", 4))
_RAW3: tl.constexpr = tl.constexpr(_raw_asm(5, "0x00070007", 3))
_RAW3_TOP: tl.constexpr = tl.constexpr("{\n" + _TOP3 + "\nmov.b32 $0, t;\n}")


@triton.jit
def _raw4(w, ASM: tl.constexpr):
    """W4 word -> fp16 pairs (1024 + u_j, 1024 + u_{j+4}), j = 0..3."""
    if ASM:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(_RAW4, "=r,=r,=r,=r,r", [w],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                                   pack=1)
    else:
        t0, t1, t2, t3 = _dec4(w, w, w, -1024.0, False)  # the twin's u - z with z = -1024
    return t0, t1, t2, t3


@triton.jit
def _raw3(w, ASM: tl.constexpr):
    """W3 word -> fp16 pairs (1024 + u_2i, 1024 + u_2i+1), i = 0..4."""
    if ASM:
        t0, t1, t2, t3, t4 = tl.inline_asm_elementwise(_RAW3, "=r,=r,=r,=r,=r,r", [w],
                                                       dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
                                                       is_pure=True, pack=1)
    else:
        t0, t1, t2, t3, t4 = _dec3(w, w, w, w, -1024.0, False)
    return t0, t1, t2, t3, t4


@triton.jit
def _raw3_top(a, b, c, ASM: tl.constexpr):
    if ASM:
        t = tl.inline_asm_elementwise(_RAW3_TOP, "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    else:
        t = _dec3_top(a, b, c, a, -1024.0, False)
    return t


@triton.jit
def _halves(p, ASM: tl.constexpr):
    """int32 fp16 pairs ``[...]`` -> fp16 ``[..., 2]`` (low half first): a register rename on the GPU."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        lo = _h(p, False)
        hi = _h(p, True)
    return tl.join(lo, hi)


@triton.jit
def _join4(a, b, c, d):
    """``[...]`` x 4 -> ``[..., 2, 2]`` with element ``[i, k]`` the ``(2 i + k)``-th argument."""
    return tl.join(tl.join(a, c), tl.join(b, d))


@triton.jit
def _tile_w4(w, s2, za, zb, zf, SCALE: tl.constexpr, ASM: tl.constexpr, RAW: tl.constexpr = False):
    """Words ``[KB, 2, NR, 4, 8, 4]`` (see ``_index``) -> fp16 tile ``[BN, 32 KB]`` in fragment order:
    ``(u - z) * s`` (SCALE) or ``u - z``, or RAW: ``1024 + u``."""
    KB: tl.constexpr = w.shape[0]
    NR: tl.constexpr = w.shape[2]
    if RAW:
        t0, t1, t2, t3 = _raw4(w, ASM)
    else:
        t0, t1, t2, t3 = _dec4(w, za, zb, zf, ASM)
    if SCALE and not RAW:
        t0 = _scale(t0, s2, ASM)
        t1 = _scale(t1, s2, ASM)
        t2 = _scale(t2, s2, ASM)
        t3 = _scale(t3, s2, ASM)
    f = tl.reshape(_halves(_join4(t0, t1, t2, t3), ASM), (KB, 2, NR, 4, 8, 4, 4, 2))  # [.., c, j, b]
    # -> [nr, nh, n3, nl, kb, j, c, b]: row nr*64 + nh*16 + n3*8 + nl, column 32 kb + 8 j + 2 c + b
    return tl.reshape(tl.permute(f, (2, 3, 1, 4, 0, 6, 5, 7)), (NR * 64, KB * 32))


@triton.jit
def _tile_w3(w0, w1, w2, s2, za, zb, zc, zf, SCALE: tl.constexpr, ASM: tl.constexpr, RAW: tl.constexpr = False):
    """Chunks ``[1, 2, NR, 4, 8, 4]`` (3 words each) -> fp16 tile ``[BN, 128]`` in fragment order
    (values as ``_tile_w4``)."""
    NR: tl.constexpr = w0.shape[2]
    if RAW:
        a0, a1, a2, a3, a4 = _raw3(w0, ASM)
        b0, b1, b2, b3, b4 = _raw3(w1, ASM)
        c0, c1, c2, c3, c4 = _raw3(w2, ASM)
        c5 = _raw3_top(w0, w1, w2, ASM)
    else:
        a0, a1, a2, a3, a4 = _dec3(w0, za, zb, zc, zf, ASM)
        b0, b1, b2, b3, b4 = _dec3(w1, za, zb, zc, zf, ASM)
        c0, c1, c2, c3, c4 = _dec3(w2, za, zb, zc, zf, ASM)
        c5 = _dec3_top(w0, w1, w2, za, zf, ASM)
    if SCALE and not RAW:
        a0, a1, a2, a3, a4 = (_scale(a0, s2, ASM), _scale(a1, s2, ASM), _scale(a2, s2, ASM), _scale(a3, s2, ASM),
                              _scale(a4, s2, ASM))
        b0, b1, b2, b3, b4 = (_scale(b0, s2, ASM), _scale(b1, s2, ASM), _scale(b2, s2, ASM), _scale(b3, s2, ASM),
                              _scale(b4, s2, ASM))
        c0, c1, c2, c3, c4 = (_scale(c0, s2, ASM), _scale(c1, s2, ASM), _scale(c2, s2, ASM), _scale(c3, s2, ASM),
                              _scale(c4, s2, ASM))
        c5 = _scale(c5, s2, ASM)
    # pairs p = 0..15 are a0..a4, b0..b4, c0..c5; joined so the new dims are the bits of p, high first
    q0 = tl.join(tl.join(a0, b3), tl.join(a4, c2))  # p = 0, 8, 4, 12
    q1 = tl.join(tl.join(a1, b4), tl.join(b0, c3))  # p = 1, 9, 5, 13
    q2 = tl.join(tl.join(a2, c0), tl.join(b1, c4))  # p = 2, 10, 6, 14
    q3 = tl.join(tl.join(a3, c1), tl.join(b2, c5))  # p = 3, 11, 7, 15
    t = tl.join(tl.join(q0, q2), tl.join(q1, q3))
    f = tl.reshape(_halves(t, ASM), (2, NR, 4, 8, 4, 16, 2))  # [n3, nr, nh, nl, c, p, b]
    # column 32 s' + 16 s + 8 h + 2 c + b with p = 4 s' + 2 s + h, i.e. 8 p + 2 c + b
    return tl.reshape(tl.permute(f, (1, 2, 0, 3, 5, 4, 6)), (NR * 64, 128))


@triton.jit
def _nvec(v, BN: tl.constexpr):
    """A per-row quantity loaded as ``[1, 2, NR, 4, 8, 1]`` (see ``_index``) -> ``[BN]`` in row order."""
    NR: tl.constexpr = v.shape[2]
    return tl.reshape(tl.permute(tl.reshape(v, (2, NR, 4, 8)), (1, 2, 0, 3)), (BN,))


@triton.jit
def _x_fragment_order(xa, BITS: tl.constexpr):
    """x ``[BM, 128]`` in natural k order -> the tile's column order (see the module docstring)."""
    BM: tl.constexpr = xa.shape[0]
    if BITS == 4:  # k = 32 kb + 8 c + 4 b + j
        v = tl.permute(tl.reshape(xa, (BM, 4, 4, 2, 4)), (0, 1, 4, 2, 3))
    else:  # k = 32 c + 2 p + b
        v = tl.permute(tl.reshape(xa, (BM, 4, 16, 2)), (0, 2, 1, 3))
    return tl.reshape(v, (BM, 128))


@triton.jit
def _index(NR: tl.constexpr, KB: tl.constexpr):
    """Index tensors of the words ``[KB, 2, NR, 4, 8, 4]``: tile row ``nr*64 + nh*16 + n3*8 + nl``, slab
    ``kb``, lane ``c``. In Triton's default layout for this shape the last two dimensions (c, nl) fill a
    warp's 32 lanes and the next ones (nh, then nr) its warps, the rest sit in registers: exactly where
    the MMA's A fragments hold these rows and columns (4 warps: nr in registers; 8 warps: one warpgroup
    per nr), so the decoded tile needs no layout conversion."""
    kb = tl.arange(0, KB)[:, None, None, None, None, None]
    n3 = tl.arange(0, 2)[None, :, None, None, None, None]
    nr = tl.arange(0, NR)[None, None, :, None, None, None]
    nh = tl.arange(0, 4)[None, None, None, :, None, None]
    nl = tl.arange(0, 8)[None, None, None, None, :, None]
    c = tl.arange(0, 4)[None, None, None, None, None, :]
    return kb, nr * 64 + nh * 16 + n3 * 8 + nl, c


@triton.jit
def _columns(r, NR: tl.constexpr, PERM: tl.constexpr):
    """Memory column (within the tile) of tile row ``r = nr*64 + nh*16 + n3*8 + nl``. PERM: the rows a
    thread holds in registers (n3, nr with 4 warps) are adjacent columns, ``nh*16*NR + nl*2*NR + nr*2 +
    n3``, in the order of its registers, so its words of a k-row load together (run 13: the words alone
    read in 40.8 µs by 16-byte loads against 46.4 by 4-byte ones). Triton 3.6's layout for the words
    (TTGIR): W3 registers run n3, nr (four adjacent words: one 16-byte load); W4 n3, kb, kb, nr (pairs:
    8-byte loads). A sum over n does not care which column a row is, as long as the output, bias,
    scale and zero use the same map."""
    if PERM:
        nr = r // 64
        nh = (r // 16) % 4
        n3 = (r // 8) % 2
        nl = r % 8
        r = nh * (16 * NR) + nl * (2 * NR) + nr * 2 + n3
    return r


@triton.jit
def _ldg(p, ASM: tl.constexpr, VEC: tl.constexpr = 1):
    """Load through inline PTX where it runs: the result keeps the layout of its address tensor. VEC 4
    (2) (words): one 16-byte (8-byte) load per four (two) consecutive elements of a thread, addressed by
    the first, which must be that many adjacent, aligned words (PERM's column order, ``_columns``)."""
    if ASM:
        a = p.to(tl.int64, bitcast=True)
        if p.dtype.element_ty == tl.int32 and VEC == 4:
            hint: tl.constexpr = ".L2::256B" if ASM == 2 else ""
            v = tl.inline_asm_elementwise("ld.global.nc.L1::no_allocate" + hint + ".v4.b32 {$0, $1, $2, $3}, [$4];",
                                          "=r,=r,=r,=r,l,l,l,l", [a], dtype=tl.int32, is_pure=True, pack=4)
        elif p.dtype.element_ty == tl.int32 and VEC == 2:
            hint2: tl.constexpr = ".L2::256B" if ASM == 2 else ""
            v = tl.inline_asm_elementwise("ld.global.nc.L1::no_allocate" + hint2 + ".v2.b32 {$0, $1}, [$2];",
                                          "=r,=r,l,l", [a], dtype=tl.int32, is_pure=True, pack=2)
        elif p.dtype.element_ty == tl.int32 and ASM == 2:  # words, L2 asked for the whole 256 B block (run 12)
            v = tl.inline_asm_elementwise("ld.global.nc.L1::no_allocate.L2::256B.b32 $0, [$1];", "=r,l", [a],
                                          dtype=tl.int32, is_pure=True, pack=1)
        elif p.dtype.element_ty == tl.int32:
            v = tl.inline_asm_elementwise("ld.global.nc.L1::no_allocate.b32 $0, [$1];", "=r,l", [a],
                                          dtype=tl.int32, is_pure=True, pack=1)
        elif p.dtype.element_ty == tl.float16:
            v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [a], dtype=tl.float16,
                                          is_pure=True, pack=1)
        else:  # uint8 zero points
            v = tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [a], dtype=tl.int32,
                                          is_pure=True, pack=1)
    else:
        v = tl.load(p)
    return v


@triton.jit
def _loads(words_ptr, scale_ptr, zero_ptr, it, wbase, szbase, kb, c, BITS: tl.constexpr, SYM: tl.constexpr,
           PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr, T: tl.constexpr, ASM: tl.constexpr,
           VEC: tl.constexpr = 1):
    """Words (and grouped scale / zero) of k-block ``it``. ``wbase``/``szbase``: row offsets."""
    if BITS == 4:  # decode row (word) of lane c of slab kb: 16 per k-block
        row = it * 16 + kb * 4 + c
        w0 = _ldg(words_ptr + wbase + row * T, ASM, VEC)
        w1 = w0
        w2 = w0
        RPI: tl.constexpr = 16
    else:  # chunk of lane c: 4 per k-block, 3 words each
        row = it * 4 + c
        p = words_ptr + wbase + row * (3 * T)
        w0 = _ldg(p, ASM, VEC)
        w1 = _ldg(p + T, ASM, VEC)
        w2 = _ldg(p + 2 * T, ASM, VEC)
        RPI: tl.constexpr = 4
    if PER_CHANNEL:
        s = w0
        z = w0
    else:
        if GROUP_ROWS >= RPI:  # one group for the whole k-block
            g = (it * RPI) // GROUP_ROWS
        else:
            g = row // GROUP_ROWS
        s = _ldg(scale_ptr + szbase + g * T, ASM)
        z = s
        if not SYM:
            z = _ldg(zero_ptr + szbase + g * T, ASM)
    return w0, w1, w2, s, z


@triton.jit
def gemm_h2_kernel(
    x_ptr, words_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, rows_total, groups_pad, iters_per_split, n_iters,
    BITS: tl.constexpr, SYM: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_ROWS: tl.constexpr,
    T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    ASM: tl.constexpr, ACC: tl.constexpr = False, GLU: tl.constexpr = 0, SCALE_AFTER: tl.constexpr = True,
    PERM: tl.constexpr = False,
):
    """``out^T[BN, BM] = W x^T`` over k-blocks of 128, split over ``program_id(1)``; ``program_id(2)``:
    block of BM rows of x. ``GROUP_ROWS``: decode rows (W4 words, W3 chunks) per group. ACC: add
    into a zeroed fp32 ``out`` (as gemv_h2's accumulate mode). GLU: silu-mul epilogue over gate/up
    blocks of GLU (decode.store_out). PERM: tile rows in the column order of ``_columns`` (16-byte word
    loads with 4 warps; not with GLU, whose epilogue needs the natural order)."""
    WPR: tl.constexpr = 3 if BITS == 3 else 1
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SYM else 0
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(2)
    it0 = tl.program_id(1) * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)

    NR: tl.constexpr = BN // 64
    offs_n = pid_n * BN + _columns(tl.arange(0, BN), NR, PERM)  # tile row order
    offs_m = pid_m * BM + tl.arange(0, BM)
    n0 = pid_n * BN  # BN divides T
    KB: tl.constexpr = 4 if BITS == 4 else 1
    kb, rows, c = _index(NR, KB)
    rows = _columns(rows, NR, PERM)
    wbase = (n0 // T) * (rows_total * WPR * T) + (n0 % T) + rows
    sz = (n0 // T) * (groups_pad * T) + (n0 % T)
    szbase = sz + rows
    szvec = sz + _columns(tl.arange(0, BN), NR, PERM)
    kk0 = tl.arange(0, BK_H2)
    # POST (one group per k-block, SCALE_AFTER): the tile is u - z and the group's scale multiplies its
    # partial sums (BN x BM FMAs instead of a pair multiply per two weights, but a second [BN, BM]
    # accumulator: worth it at small BM). Per-channel: the tile is the
    # bare 1024 + u, the dot sum_k x_k (1024 + u_k), and after the loop -(1024 + z) sum_k x_k and the
    # scale are applied; the cancellation costs about 2^-24 * 1024 / |u - z| of the sum, far inside
    # the 16-bit output's 2^-11.
    RPI: tl.constexpr = 16 if BITS == 4 else 4
    POST: tl.constexpr = PER_CHANNEL or (GROUP_ROWS >= RPI and SCALE_AFTER)

    xacc = tl.zeros([BM, BK_H2], dtype=tl.float32)  # per-channel: x summed over k-blocks
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    # register double-buffering: the loads of k-block it + 1 are issued before block it is decoded, by
    # inline PTX so that they keep the fragment layout. Run 9 (NOTES.md): a tl.range cp.async ring made
    # Triton convert the decoded tile through shared memory (4.3 instead of 2.5 instructions per
    # weight), and loading 2-4 blocks ahead lost everywhere (more registers, fewer programs per SM).
    VEC: tl.constexpr = (4 if BITS == 3 else 2) if PERM and NR == 2 else 1  # see _columns
    nw0, nw1, nw2, ns, nz = _loads(words_ptr, scale_ptr, zero_ptr, it0, wbase, szbase, kb, c, BITS, SYM,
                                   PER_CHANNEL, GROUP_ROWS, T, ASM, VEC)
    for it in range(it0, it1):
        w0, w1, w2, s, z = nw0, nw1, nw2, ns, nz
        # the last iteration re-reads its own block: harmless
        nw0, nw1, nw2, ns, nz = _loads(words_ptr, scale_ptr, zero_ptr, tl.minimum(it + 1, it1 - 1), wbase, szbase,
                                       kb, c, BITS, SYM, PER_CHANNEL, GROUP_ROWS, T, ASM, VEC)
        kk = it * BK_H2 + kk0
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        if PER_CHANNEL:  # bare 1024 + u; the zero point and the scale after the loop
            if BITS == 4:
                wt = _tile_w4(w0, w0, w0, w0, 0.0, False, ASM, True)
            else:
                wt = _tile_w3(w0, w1, w2, w0, w0, w0, w0, 0.0, False, ASM, True)
            acc = tl.dot(wt, tl.trans(_x_fragment_order(xa, BITS)), acc)
            xacc += xa.to(tl.float32)  # reduced over k once, after the loop
        elif POST:  # u - z (exact); the group's scale multiplies its partial sums
            zf, za, zb, zc = _zconst(z, OFFSET, SYM, BITS, w0, ASM)
            if BITS == 4:
                wt = _tile_w4(w0, w0, za, zb, zf, False, ASM)
            else:
                wt = _tile_w3(w0, w1, w2, w0, za, zb, zc, zf, False, ASM)
            part = tl.dot(wt, tl.trans(_x_fragment_order(xa, BITS)))
            acc += _nvec(s, BN).to(tl.float32)[:, None] * part
        else:
            zf, za, zb, zc = _zconst(z, OFFSET, SYM, BITS, w0, ASM)
            hs = _bits(s)
            s2 = hs | (hs << 16)
            if BITS == 4:
                wt = _tile_w4(w0, s2, za, zb, zf, True, ASM)
            else:
                wt = _tile_w3(w0, w1, w2, s2, za, zb, zc, zf, True, ASM)
            acc = tl.dot(wt, tl.trans(_x_fragment_order(xa, BITS)), acc)
    if PER_CHANNEL:
        if SYM:
            zoff = tl.full([BN], 1024.0 + OFFSET, tl.float32)
        else:
            zoff = tl.load(zero_ptr + szvec).to(tl.float32) + 1024.0
        xsum = tl.sum(xacc, axis=1)
        acc = (acc - zoff[:, None] * xsum[None, :]) * tl.load(scale_ptr + szvec).to(tl.float32)[:, None]
    y = tl.trans(acc)  # [BM, BN]
    if PERM:  # back to the columns' own order, once per program, so the epilogue's stores and atomics coalesce
        y = tl.reshape(tl.permute(tl.reshape(y, (BM, NR, 4, 2, 8)), (0, 2, 4, 1, 3)), (BM, BN))
        offs_n = pid_n * BN + tl.arange(0, BN)
    finish(y, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, cnt_ptr, pid_m * tl.num_programs(0) + pid_n,
           it0 == 0, HAS_BIAS, SPLIT, GLU, ACC, tl.num_programs(1))
