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
        h = (h.to(tl.float32) + tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(res_ptr.dtype.element_ty)  # the residual stream stays in the model dtype
        tl.store(res_ptr + row * N + offs, h, mask=mask)
    hf = h.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    y = (hf * r).to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor | None, res: torch.Tensor, w: torch.Tensor, eps: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``res += x`` (in place, model dtype), then ``RMSNorm(res) * w`` as transformers computes it."""
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
def _rope_attn_kernel(qkv_ptr, inv_freq_ptr, pos_ptr, k_cache, v_cache, out_ptr, ws_ptr, cnt_ptr, stride_qkv, L,
                      scale, S, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
                      SB: tl.constexpr, PDL: tl.constexpr):
    """Program (b, h, s): rotary on q head h and on its kv head's new k (every program; cheap), then
    attention of that q over cache block s (positions [s BL, s BL + BL) below ``pos``) plus, in the
    block holding ``pos``, the new token from registers -- so no program waits for another's cache
    write; program (b, h0 of the kv group, 0) writes the new k and v into the caches.

    Why split the positions: one program per head walking the whole cache took 15 µs per layer at
    a 128-256 token context on the H100 (28 programs, each a chain of dependent loads), a sixth of
    a W4 decode step. Blocks past ``pos`` exit at once; with more than one block, each writes
    (max, sum, acc) to ``ws`` and the program that arrives last (per-head counter) merges them."""
    _prior_done(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    sid = tl.program_id(2)
    G: tl.constexpr = HQ // HKV
    j = h // G
    p = tl.load(pos_ptr)
    n_act = p // BL + 1  # blocks holding any of the positions [0, p]
    if sid < n_act:
        half = tl.arange(0, D // 2)
        d = tl.arange(0, D)
        ang = p.to(tl.float32) * tl.load(inv_freq_ptr + half)
        c = tl.cos(ang)
        sn = tl.sin(ang)
        row = qkv_ptr + b * stride_qkv
        q1 = tl.load(row + h * D + half).to(tl.float32)
        q2 = tl.load(row + h * D + D // 2 + half).to(tl.float32)
        # q and k rounded to the model dtype after the rotation, as when they pass through memory
        qr1 = (q1 * c - q2 * sn).to(out_ptr.dtype.element_ty).to(tl.float32) * scale
        qr2 = (q2 * c + q1 * sn).to(out_ptr.dtype.element_ty).to(tl.float32) * scale
        k1 = tl.load(row + (HQ + j) * D + half).to(tl.float32)
        k2 = tl.load(row + (HQ + j) * D + D // 2 + half).to(tl.float32)
        kr1 = (k1 * c - k2 * sn).to(k_cache.dtype.element_ty)
        kr2 = (k2 * c + k1 * sn).to(k_cache.dtype.element_ty)
        vn = tl.load(row + (HQ + HKV + j) * D + d)
        kb = k_cache + (b * HKV + j) * L * D
        vb = v_cache + (b * HKV + j) * L * D
        if (h % G == 0) & (sid == 0):
            tl.store(kb + p * D + half, kr1)
            tl.store(kb + p * D + D // 2 + half, kr2)
            tl.store(vb + p * D + d, vn.to(v_cache.dtype.element_ty))
        ls = sid * BL + tl.arange(0, BL)
        lm = ls < p
        ka = tl.load(kb + ls[:, None] * D + half[None, :], mask=lm[:, None], other=0.0).to(tl.float32)
        kz = tl.load(kb + ls[:, None] * D + D // 2 + half[None, :], mask=lm[:, None], other=0.0).to(tl.float32)
        v = tl.load(vb + ls[:, None] * D + d[None, :], mask=lm[:, None], other=0.0).to(tl.float32)
        sc = tl.where(lm, tl.sum(ka * qr1[None, :], axis=1) + tl.sum(kz * qr2[None, :], axis=1), -float("inf"))
        s_new = tl.sum(kr1.to(tl.float32) * qr1, axis=0) + tl.sum(kr2.to(tl.float32) * qr2, axis=0)
        s_new = tl.where(sid == n_act - 1, s_new, -float("inf"))  # the new token lives in the last block
        m = tl.maximum(tl.max(sc, axis=0), s_new)  # finite: a block below the last is full
        pr = tl.exp(sc - m)
        pn = tl.exp(s_new - m)
        acc = tl.sum(pr[:, None] * v, axis=0) + pn * vn.to(tl.float32)
        lsum = tl.sum(pr, axis=0) + pn
        dst = out_ptr + (b * HQ + h) * D + d
        if n_act == 1:
            tl.store(dst, (acc / lsum).to(out_ptr.dtype.element_ty))
        else:
            head = b * HQ + h
            wp = ws_ptr + (head * S + sid) * (D + 2)
            # added into the zeroed workspace: atomics land in L2, where the last program reads them
            # back and zeroes them again (as the split-K epilogue does)
            tl.atomic_add(wp + 2 + d, acc)
            tl.atomic_add(wp + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, m, lsum))
            tl.debug_barrier()
            old = tl.atomic_add(cnt_ptr + head, 1)
            if old == n_act - 1:
                mx = tl.full([1], float("-inf"), tl.float32)
                num = tl.zeros([D], dtype=tl.float32)
                den = tl.zeros([1], dtype=tl.float32)
                for s0 in range(0, n_act, SB):
                    ss = s0 + tl.arange(0, SB)
                    sm = ss < n_act
                    base = ws_ptr + (head * S + ss) * (D + 2)
                    ms = tl.atomic_add(base, tl.zeros([SB], tl.float32), mask=sm)
                    ms = tl.where(sm, ms, -float("inf"))  # masked atomics return anything
                    lsm = tl.atomic_add(base + 1, tl.zeros([SB], tl.float32), mask=sm)
                    lsm = tl.where(sm, lsm, 0.0)
                    accs = tl.atomic_add(base[:, None] + 2 + d[None, :], tl.zeros([SB, D], tl.float32),
                                         mask=sm[:, None])
                    accs = tl.where(sm[:, None], accs, 0.0)
                    tl.store(base, tl.zeros([SB], tl.float32), mask=sm)
                    tl.store(base + 1, tl.zeros([SB], tl.float32), mask=sm)
                    tl.store(base[:, None] + 2 + d[None, :], tl.zeros([SB, D], tl.float32), mask=sm[:, None])
                    mx_new = tl.maximum(mx, tl.max(ms, axis=0))
                    alpha = tl.exp(mx - mx_new)
                    wgt = tl.where(sm, tl.exp(ms - mx_new), 0.0)
                    num = num * alpha + tl.sum(wgt[:, None] * accs, axis=0)
                    den = den * alpha + tl.sum(wgt * lsm, axis=0)
                    mx = mx_new
                tl.store(dst, (num / den).to(out_ptr.dtype.element_ty))
                tl.atomic_xchg(cnt_ptr + head, 0)


_ATTN_WS: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def _attn_workspace(device: torch.device, n_floats: int, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block partials and per-head counters, both zero at rest (the merging program re-zeroes)."""
    key = (device.type, device.index)
    ws, cnt = _ATTN_WS.get(key, (None, None))
    if ws is None or ws.numel() < n_floats or cnt.numel() < n_heads:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("rope_attention: its workspace must grow during CUDA graph capture; "
                               "run one eager step with the same batch and cache length first")
        ws = torch.zeros(max(n_floats, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(n_heads, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _ATTN_WS[key] = (ws, cnt)
    return ws, cnt


def rope_attention(qkv: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, hq: int, hkv: int, out: torch.Tensor | None = None,
                   block: int = 64, num_warps: int = 4) -> torch.Tensor:
    """``rope_kv`` then ``decode_attention`` in one launch (the decode step's attention), split over
    cache blocks of ``block`` positions: returns ``[B, hq * D]`` and leaves the new k, v in the
    caches at ``pos``."""
    b = qkv.shape[0]
    d, length = k_cache.shape[-1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    out = torch.empty(b, hq * d, dtype=qkv.dtype, device=qkv.device) if out is None else out
    n_blocks = triton.cdiv(length, block)
    ws, cnt = _attn_workspace(qkv.device, b * hq * n_blocks * (d + 2), b * hq)
    pdl = pdl_active(qkv.device)
    _rope_attn_kernel[(b, hq, n_blocks)](qkv, inv_freq, pos, k_cache, v_cache, out, ws, cnt, qkv.stride(0), length,
                                         d**-0.5, n_blocks, HQ=hq, HKV=hkv, D=d, BL=block, SB=16, PDL=pdl,
                                         num_warps=num_warps, **launch_kwargs(pdl))
    return out
