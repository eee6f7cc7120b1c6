"""Fused glue for single-token decode of a Llama/Qwen2-style decoder (used by ``vlmq bench decode``).

At batch 1 a 7B layer's weights stream in about 40 µs at W4; unfused torch glue (RMSNorm alone is
six launches) would add as much again and hide the kernels being measured. Each op here is one
launch, reads the position from device memory (so a captured CUDA graph can be replayed step
after step), and computes in fp32, rounding once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .pdl import mode as pdl_active
from .pdl import launch_dependents, launch_kwargs, wait_prior


@triton.jit
def _prior_done(PDL: tl.constexpr):
    """Under PDL (pdl.mode): wait for the previous grid and let the next one be scheduled, in the
    order the mode says (these kernels are short; the next one, typically a GEMV, can start
    streaming its weights meanwhile)."""
    if PDL == 2:
        launch_dependents()
        wait_prior()
    elif PDL == 1:
        wait_prior()
        launch_dependents()


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, N, eps, HAS_X: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    _prior_done(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(res_ptr + row * N + offs, mask=mask, other=0.0)
    if HAS_X:
        # x rounded to the residual's dtype first: an fp32 x (a GEMV's accumulation buffer) adds
        # exactly what the 16-bit projection output would
        xv = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(res_ptr.dtype.element_ty)
        h = h.to(tl.float32) + xv.to(tl.float32)
        h = h.to(res_ptr.dtype.element_ty)  # the residual stream stays in the model dtype
        tl.store(res_ptr + row * N + offs, h, mask=mask)
    hf = h.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    y = (hf * r).to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor | None, res: torch.Tensor, w: torch.Tensor, eps: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``res += x`` (in place, model dtype), then ``RMSNorm(res) * w`` as transformers computes it.
    ``x`` may be fp32 (a GEMV's accumulation buffer): it is rounded to ``res``'s dtype first."""
    m, n = res.shape
    out = torch.empty_like(res) if out is None else out
    pdl = pdl_active(res.device)
    _add_rmsnorm_kernel[(m,)](res if x is None else x, res, w, out, n, eps, HAS_X=x is not None,
                              BLOCK=triton.next_power_of_2(n), PDL=pdl, num_warps=8,
                              **launch_kwargs(pdl))
    return out


@triton.jit
def _rope_kv_kernel(qkv_ptr, inv_freq_ptr, pos_ptr, q_ptr, k_cache, v_cache, stride_qkv, L,
                    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """Program (b, h): rotate q head h (h < HQ) into q_out, or rotate k / copy v of kv head h-HQ
    into the caches at the current position."""
    _prior_done(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    half = tl.arange(0, D // 2)
    pos = tl.load(pos_ptr).to(tl.float32)
    ang = pos * tl.load(inv_freq_ptr + half)
    c = tl.cos(ang)
    s = tl.sin(ang)
    base = qkv_ptr + b * stride_qkv + h * D
    x1 = tl.load(base + half).to(tl.float32)
    x2 = tl.load(base + D // 2 + half).to(tl.float32)
    r1 = x1 * c - x2 * s
    r2 = x2 * c + x1 * s
    if h < HQ:
        dst = q_ptr + (b * HQ + h) * D
        tl.store(dst + half, r1.to(q_ptr.dtype.element_ty))
        tl.store(dst + D // 2 + half, r2.to(q_ptr.dtype.element_ty))
    else:
        j = h - HQ
        p = tl.load(pos_ptr)
        dst = k_cache + ((b * HKV + j) * L + p) * D
        tl.store(dst + half, r1.to(k_cache.dtype.element_ty))
        tl.store(dst + D // 2 + half, r2.to(k_cache.dtype.element_ty))
        vsrc = qkv_ptr + b * stride_qkv + (HQ + HKV + j) * D
        vdst = v_cache + ((b * HKV + j) * L + p) * D
        d = tl.arange(0, D)
        tl.store(vdst + d, tl.load(vsrc + d))


def rope_kv(qkv: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, hq: int, hkv: int, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """Split the fused qkv ``[B, (hq + 2 hkv) * D]``: rotary on q and k, write k and v into the
    ``[B, hkv, L, D]`` caches at ``pos`` (int32 device scalar); return q ``[B, hq, D]``."""
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty(b, hq, d, dtype=qkv.dtype, device=qkv.device) if q_out is None else q_out
    pdl = pdl_active(qkv.device)
    _rope_kv_kernel[(b, hq + hkv)](qkv, inv_freq, pos, q, k_cache, v_cache, qkv.stride(0), k_cache.shape[2],
                                   HQ=hq, HKV=hkv, D=d, PDL=pdl, num_warps=1,
                                   **launch_kwargs(pdl))
    return q


@triton.jit
def _decode_attn_kernel(q_ptr, k_cache, v_cache, pos_ptr, out_ptr, L, scale,
                        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BL: tl.constexpr, PDL: tl.constexpr):
    """Program (b, h): softmax(q k^T * scale) v over cache positions [0, pos], online softmax."""
    _prior_done(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = h // (HQ // HKV)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * HQ + h) * D + d).to(tl.float32) * scale
    n = tl.load(pos_ptr) + 1
    kb = k_cache + (b * HKV + j) * L * D
    vb = v_cache + (b * HKV + j) * L * D
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for l0 in range(0, n, BL):
        ls = l0 + tl.arange(0, BL)
        lm = ls < n
        k = tl.load(kb + ls[:, None] * D + d[None, :], mask=lm[:, None], other=0.0).to(tl.float32)
        s = tl.where(lm, tl.sum(k * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)  # [BL] (m_new has shape [1])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(vb + ls[:, None] * D + d[None, :], mask=lm[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(out_ptr + (b * HQ + h) * D + d, (acc / l_i).to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its cache; returns ``[B, hq * D]``."""
    b, hq, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, hq * d, dtype=q.dtype, device=q.device) if out is None else out
    pdl = pdl_active(q.device)
    _decode_attn_kernel[(b, hq)](q, k_cache, v_cache, pos, out, length, d**-0.5, HQ=hq, HKV=hkv, D=d, BL=64,
                                 PDL=pdl, num_warps=4, **launch_kwargs(pdl))
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr, IL: tl.constexpr, PDL: tl.constexpr):
    _prior_done(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if IL:  # gate and up alternate in blocks of IL columns
        gcol = (offs // IL) * (2 * IL) + offs % IL
        ucol = gcol + IL
    else:
        gcol = offs
        ucol = N + offs
    g = tl.load(gu_ptr + row * 2 * N + gcol, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * N + ucol, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gu: torch.Tensor, out: torch.Tensor | None = None, interleave: int = 0) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[B, 2I]`` gate/up output: gate first, or (``interleave`` > 0)
    gate and up alternating in blocks of that many columns (``interleave_gate_up``)."""
    m, n2 = gu.shape
    n = n2 // 2
    if interleave and n2 % (2 * interleave):
        raise ValueError(f"{n2} gate/up columns are not whole blocks of 2 x {interleave}")
    gu = gu.contiguous()
    out = torch.empty(m, n, dtype=gu.dtype, device=gu.device) if out is None else out
    pdl = pdl_active(gu.device)
    _silu_mul_kernel[(m, triton.cdiv(n, 1024))](gu, out, n, BLOCK=1024, IL=interleave, PDL=pdl, num_warps=4,
                                                **launch_kwargs(pdl))
    return out


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor, block: int) -> torch.Tensor:
    """Rows of ``gate`` and ``up`` (``[I, ...]`` each) alternating in blocks of ``block``, so one
    GEMV tile holds the gate and up of the same outputs and can apply silu-mul in its epilogue."""
    if gate.shape != up.shape or gate.shape[0] % block:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must match, rows a multiple of {block}")
    i = gate.shape[0]
    return torch.stack([gate.reshape(i // block, block, *gate.shape[1:]),
                        up.reshape(i // block, block, *up.shape[1:])], dim=1).reshape(2 * i, *gate.shape[1:])


@triton.jit
def _kv_block(kbase, vbase, blk, p, BL: tl.constexpr, D: tl.constexpr):
    """Cache block ``blk`` of one kv head: the two halves of K (for the rotated q halves) and V, the
    positions at or past ``p`` masked; and that mask."""
    ls = blk * BL + tl.arange(0, BL)
    lm = ls < p
    half = tl.arange(0, D // 2)
    ka = tl.load(kbase + ls[:, None] * D + half[None, :], mask=lm[:, None], other=0.0)
    kz = tl.load(kbase + ls[:, None] * D + D // 2 + half[None, :], mask=lm[:, None], other=0.0)
    v = tl.load(vbase + ls[:, None] * D + tl.arange(0, D)[None, :], mask=lm[:, None], other=0.0)
    return ka, kz, v, lm


@triton.jit
def _attend(qa, qb, ka, kz, v, lm, m_i, l_i, acc, scale):
    """One cache block into the online softmax of the [GP, D] query tile (scores and P.V by tl.dot)."""
    sc = (tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kz))) * scale  # [GP, BL]
    sc = tl.where(lm[None, :], sc, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp(m_i - m_new)
    pr = tl.exp(sc - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
    l_i = l_i * alpha + tl.sum(pr, axis=1)
    return m_new, l_i, acc


@triton.jit
def _rope_attn_kernel(qkv_ptr, inv_freq_ptr, pos_ptr, k_cache, v_cache, out_ptr, ws_ptr, cnt_ptr, stride_qkv, L,
                      scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
                      NS: tl.constexpr, GP: tl.constexpr, GM: tl.constexpr, PDL: tl.constexpr,
                      MINB: tl.constexpr = 1):
    """Program (b, kv head j, split s): rotary on the G = HQ / HKV query heads of j (rows of a
    [GP >= 16, D] tile, for ``tl.dot``) and on j's new k; attention of those heads over the cache
    blocks of split s (positions below ``pos``) plus, in the last split, the new token from
    registers -- so no program waits for another's cache write; split 0 writes the new k and v.

    Why this shape: one program per query head walking the cache took 12-15 µs per layer on the
    H100 (a chain of dependent loads, and ~2000 instructions per warp: ncu, run 8), a seventh of a
    W4 decode step. Here each K/V block is read once for its whole GQA group and the scores and the
    P.V products run on tensor cores; the blocks below ``pos`` are spread over at most NS splits
    (splits past the work exit at once), each writes (max, sum, acc) per head to ``ws``, and the
    split that arrives last (per-group counter) merges them. A split takes at least MINB blocks, so
    a short cache runs in one split and writes its output directly, without the merge's dependent
    round trips (run 15: 2.323 -> 2.236 ms a W4 decode step at 128-256 positions). The position,
    the split's first cache block and the rotary frequencies are loaded before waiting on the
    previous grid (PDL): none of them is written by it (the cache below ``pos`` by earlier steps,
    ``pos`` at the end of the last one), so their latency overlaps the qkv GEMV's end."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    sid = tl.program_id(2)
    G: tl.constexpr = HQ // HKV
    p = tl.load(pos_ptr)
    nb = p // BL + 1  # blocks holding positions [0, p]
    per = tl.maximum((nb + NS - 1) // NS, MINB)  # at least MINB blocks a split: short caches skip the merge
    n_act = (nb + per - 1) // per  # splits with work
    kbase = k_cache + (b * HKV + j) * L * D
    vbase = v_cache + (b * HKV + j) * L * D
    ka0, kz0, v0, lm0 = _kv_block(kbase, vbase, sid * per, p, BL, D)  # all masked past the work
    half = tl.arange(0, D // 2)
    freq = tl.load(inv_freq_ptr + half)
    _prior_done(PDL)
    if sid < n_act:
        gi = tl.arange(0, GP)
        gm = gi < G
        qh = j * G + gi
        d = tl.arange(0, D)
        ang = p.to(tl.float32) * freq
        c = tl.cos(ang)
        sn = tl.sin(ang)
        row = qkv_ptr + b * stride_qkv
        # qkv may be fp32 (the GEMV's accumulation buffer): rounded to 16 bits as it is read
        DT: tl.constexpr = k_cache.dtype.element_ty
        q1 = tl.load(row + qh[:, None] * D + half[None, :], mask=gm[:, None], other=0.0).to(DT).to(tl.float32)
        q2 = tl.load(row + qh[:, None] * D + D // 2 + half[None, :], mask=gm[:, None], other=0.0).to(DT)
        q2 = q2.to(tl.float32)
        # q and k rounded to the cache dtype after the rotation, as when they pass through memory
        qa = (q1 * c[None, :] - q2 * sn[None, :]).to(k_cache.dtype.element_ty)
        qb = (q2 * c[None, :] + q1 * sn[None, :]).to(k_cache.dtype.element_ty)
        k1 = tl.load(row + (HQ + j) * D + half).to(DT).to(tl.float32)
        k2 = tl.load(row + (HQ + j) * D + D // 2 + half).to(DT).to(tl.float32)
        kr1 = (k1 * c - k2 * sn).to(DT)
        kr2 = (k2 * c + k1 * sn).to(DT)
        vn = tl.load(row + (HQ + HKV + j) * D + d).to(DT)
        if sid == 0:
            tl.store(kbase + p * D + half, kr1)
            tl.store(kbase + p * D + D // 2 + half, kr2)
            tl.store(vbase + p * D + d, vn.to(v_cache.dtype.element_ty))
        # the new token opens the last split's softmax (every other block below it is full)
        s_new = (tl.sum(qa.to(tl.float32) * kr1.to(tl.float32)[None, :], axis=1)
                 + tl.sum(qb.to(tl.float32) * kr2.to(tl.float32)[None, :], axis=1)) * scale
        last = sid == n_act - 1
        m_i = tl.where(last, s_new, -float("inf"))
        l_i = tl.where(last, 1.0, 0.0) + tl.zeros([GP], tl.float32)
        acc = tl.where(last, 1.0, 0.0) * vn.to(tl.float32)[None, :] + tl.zeros([GP, D], tl.float32)
        m_i, l_i, acc = _attend(qa, qb, ka0, kz0, v0, lm0, m_i, l_i, acc, scale)
        for blk in range(sid * per + 1, tl.minimum(sid * per + per, nb)):
            ka, kz, v, lm = _kv_block(kbase, vbase, blk, p, BL, D)
            m_i, l_i, acc = _attend(qa, qb, ka, kz, v, lm, m_i, l_i, acc, scale)
        if n_act == 1:
            tl.store(out_ptr + (b * HQ + qh)[:, None] * D + d[None, :],
                     (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gm[:, None])
        else:
            # added into the zeroed workspace (relaxed atomics land in L2; the counter's acq_rel
            # atomic after the barrier orders them); the merging split reads them back and re-zeroes
            wp = ws_ptr + ((b * HQ + qh) * NS + sid) * (D + 2)
            tl.atomic_add(wp[:, None] + 2 + d[None, :], acc, mask=gm[:, None], sem="relaxed")
            tl.atomic_add(wp, m_i, mask=gm, sem="relaxed")
            tl.atomic_add(wp + 1, l_i, mask=gm, sem="relaxed")
            tl.debug_barrier()
            grp = b * HKV + j
            old = tl.atomic_add(cnt_ptr + grp, 1)
            if old == n_act - 1:
                r = tl.arange(0, GM * NS)  # row = head * NS + split
                rh = r // NS
                rm = (rh < G) & (r % NS < n_act)
                rp = ws_ptr + ((b * HQ + j * G + rh) * NS + r % NS) * (D + 2)
                ms = tl.atomic_add(rp, tl.zeros([GM * NS], tl.float32), mask=rm, sem="relaxed")
                lsm = tl.atomic_add(rp + 1, tl.zeros([GM * NS], tl.float32), mask=rm, sem="relaxed")
                accs = tl.atomic_add(rp[:, None] + 2 + d[None, :], tl.zeros([GM * NS, D], tl.float32),
                                     mask=rm[:, None], sem="relaxed")
                tl.store(rp, tl.zeros([GM * NS], tl.float32), mask=rm)
                tl.store(rp + 1, tl.zeros([GM * NS], tl.float32), mask=rm)
                tl.store(rp[:, None] + 2 + d[None, :], tl.zeros([GM * NS, D], tl.float32), mask=rm[:, None])
                ms = tl.reshape(tl.where(rm, ms, -float("inf")), [GM, NS])  # masked atomics return anything
                lsm = tl.reshape(tl.where(rm, lsm, 0.0), [GM, NS])
                accs = tl.reshape(tl.where(rm[:, None], accs, 0.0), [GM, NS, D])
                mx = tl.max(ms, axis=1)  # [GM]; -inf only for padding heads
                mx = tl.where(mx == -float("inf"), 0.0, mx)
                w = tl.exp(ms - mx[:, None])  # [GM, NS]
                num = tl.sum(w[:, :, None] * accs, axis=1)  # [GM, D]
                den = tl.sum(w * lsm, axis=1)
                hh = tl.arange(0, GM)
                tl.store(out_ptr + (b * HQ + j * G + hh)[:, None] * D + d[None, :],
                         (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=(hh < G)[:, None])
                tl.atomic_xchg(cnt_ptr + grp, 0)


_ATTN_BLOCK: dict[tuple, int] = {}  # (device, head dim, group, block, warps) -> the block that fits


def rope_attention(qkv: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, hq: int, hkv: int, out: torch.Tensor | None = None,
                   block: int = 128, splits: int = 8, num_warps: int = 4, split_from: int = 512) -> torch.Tensor:
    """``rope_kv`` then ``decode_attention`` in one launch (the decode step's attention): one
    program per (sequence, kv head, split), the cache blocks of ``block`` positions spread over at
    most ``splits`` of them. Returns ``[B, hq * D]`` and leaves the new k, v in the caches at
    ``pos``. Head dim a power of 2 >= 16 and ``block`` >= 16 (tensor-core tiles). ``qkv`` may be
    fp32 (a GEMV's accumulation buffer; rounded to the cache dtype as it is read); ``out`` has the
    cache's dtype. ``split_from``: the positions a split holds at least, so a cache shorter than it
    is read by one program per group with no merge. These defaults are run 15's, timed in the W4
    decode step against run 8's 32-position blocks over 8 splits with 2 warps: -3.1 µs a layer at
    128-256 positions (one split), -5.8 at 2048-2176 (4-5 splits of 512)."""
    b = qkv.shape[0]
    d, length = k_cache.shape[-1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if d < 16 or d & (d - 1) or block < 16 or block & (block - 1):
        raise ValueError(f"head dim ({d}) and block ({block}) must be powers of 2, at least 16")
    g = hq // hkv
    out = torch.empty(b, hq * d, dtype=k_cache.dtype, device=qkv.device) if out is None else out
    from .dispatch import workspace

    pdl = pdl_active(qkv.device)
    # the K/V tiles take ~8 * block * d bytes of shared memory (128 KB at 128 x 128): a block the GPU
    # cannot hold (head dim 256 on the H100, 128 on GPUs with ~100 KB) is halved until one fits
    key = (qkv.device, d, g, block, num_warps)
    bl = _ATTN_BLOCK.get(key, block)
    while True:
        ns = triton.next_power_of_2(max(1, min(splits, triton.cdiv(length, bl))))
        ws, cnt = workspace(qkv.device, b * hq * ns * (d + 2), b * hkv, pool="attention")
        try:
            _rope_attn_kernel[(b, hkv, ns)](qkv, inv_freq, pos, k_cache, v_cache, out, ws, cnt, qkv.stride(0), length,
                                            d**-0.5, HQ=hq, HKV=hkv, D=d, BL=bl, NS=ns,
                                            GP=max(16, triton.next_power_of_2(g)), GM=triton.next_power_of_2(g),
                                            PDL=pdl, MINB=max(1, -(-split_from // bl)),
                                            num_warps=num_warps, **launch_kwargs(pdl))
            break
        except OutOfResources:
            if bl <= 16:
                raise
            bl //= 2
    _ATTN_BLOCK[key] = bl
    return out
