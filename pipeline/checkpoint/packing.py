"""Dense int32 bit packing, bit-compatible with compressed-tensors' ``pack-quantized`` format.

Layout (METHODS.md §6, compressed-tensors >= 0.17): along the packed dimension, element ``j``
occupies bits ``[j*b mod 32, ...)`` of word ``j*b // 32``, least significant bit first; when
``32`` is not a multiple of ``b`` (3 bits) a value straddles two words. 32 consecutive values
fill exactly ``b`` words, so ``n`` values need ``ceil(n*b/32)`` words.

Stored codes are *unsigned* ``[0, 2^b - 1]``. compressed-tensors reasons in the signed domain
(``q_s = q_u - 2^(b-1)``, ``zero_s = zero_u - 2^(b-1)``) and adds ``2^(b-1)`` when it packs, so:
- our asymmetric codes (unsigned, with unsigned zero) are stored as they are, and
  ``(q_u - zero_u) == (q_s - zero_s)`` keeps ``W = (q - zero) * scale`` unchanged;
- our symmetric codes (signed, no zero) are stored shifted by ``+2^(b-1)``.

Everything here is pure, vectorized torch; large matrices are processed in row chunks so the
temporaries stay bounded (an 8192 x 28672 weight is never copied whole into a wider dtype).
"""

from __future__ import annotations

import math

import torch

from ..quant.quantizer import QuantScheme

_CHUNK_ELEMS = 1 << 24  # values per row chunk: bounds the int32 temporaries to ~64 MiB each


def packed_len(n: int, bits: int) -> int:
    """Words needed for ``n`` values of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits, got {bits}")


def _row_chunks(rows: int, row_elems: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of at most ``_CHUNK_ELEMS`` elements each."""
    step = max(1, _CHUNK_ELEMS // max(1, row_elems))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v`` int32 ``[r, 32*g]`` unsigned codes -> int32 words ``[r, g*bits]``.

    Bit fields are disjoint, so ``|=`` of shifted values builds each word; a shift into bit 31
    gives the intended two's-complement pattern (the words are bit containers, not numbers).
    """
    r, n = v.shape
    if 32 % bits == 0:  # fast path: words are independent; disjoint fields, so sum == OR, no overflow
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=v.device) * bits
        return (v.view(r, n // per, per) << shifts).sum(-1, dtype=torch.int32)
    g = n // 32
    v = v.view(r, g, 32)
    out = torch.zeros(r, g, bits, dtype=torch.int32, device=v.device)
    for j in range(32):
        w, off = divmod(j * bits, 32)
        out[:, :, w] |= v[:, :, j] << off
        if off + bits > 32:  # the value straddles into the next word: its high bits go there
            out[:, :, w + 1] |= v[:, :, j] >> (32 - off)
    return out.view(r, g * bits)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` in ``[0, 2^bits - 1]`` along the last dim into int32 ``[..., ceil(n*b/32)]``."""
    _check_bits(bits)
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise TypeError(f"pack_int32 needs integer codes, got {values.dtype}")
    lead, n = values.shape[:-1], values.shape[-1]
    flat = values.reshape(-1, n)
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= 1 << bits:
            raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got [{int(lo)}, {int(hi)}]")
    rows = flat.shape[0]
    n_words = packed_len(n, bits)
    padded = math.ceil(n / 32) * 32
    out = torch.empty(rows, n_words, dtype=torch.int32, device=values.device)
    for r0, r1 in _row_chunks(rows, padded):
        chunk = flat[r0:r1].to(torch.int32)
        if padded > n:
            chunk = torch.nn.functional.pad(chunk, (0, padded - n))
        out[r0:r1] = _pack_rows(chunk, bits)[:, :n_words]
    return out.reshape(*lead, n_words)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words ``[r, g*bits]`` -> int32 codes ``[r, 32*g]`` (masks undo arithmetic shifts)."""
    r, nw = words.shape
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=words.device) * bits
        return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(r, nw * per)
    g = nw // bits
    words = words.view(r, g, bits)
    out = torch.empty(r, g, 32, dtype=torch.int32, device=words.device)
    for j in range(32):
        w, off = divmod(j * bits, 32)
        lo_bits = min(bits, 32 - off)
        val = (words[:, :, w] >> off) & ((1 << lo_bits) - 1)
        if lo_bits < bits:
            val |= (words[:, :, w + 1] & ((1 << (bits - lo_bits)) - 1)) << lo_bits
        out[:, :, j] = val
    return out.view(r, g * 32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int16) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[..., ceil(n*b/32)]`` -> unsigned codes ``[..., n]``."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {packed.dtype}")
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"{packed.shape[-1]} words cannot hold exactly {n} values of {bits} bits")
    lead, nw = packed.shape[:-1], packed.shape[-1]
    flat = packed.reshape(-1, nw)
    rows = flat.shape[0]
    full_words = math.ceil(n / 32) * bits
    out = torch.empty(rows, n, dtype=dtype, device=packed.device)
    for r0, r1 in _row_chunks(rows, full_words * 32 // bits):
        chunk = flat[r0:r1]
        if full_words > nw:
            chunk = torch.nn.functional.pad(chunk, (0, full_words - nw))
        out[r0:r1] = _unpack_rows(chunk.contiguous(), bits)[:, :n].to(dtype)
    return out.reshape(*lead, n)


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned zero points ``[out, n_groups]`` packed along ``out``: int32 ``[ceil(out*b/32), n_groups]``."""
    return pack_int32(zero.t(), bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_points`: int16 ``[out, n_groups]``."""
    return unpack_int32(packed.t(), bits, out_features).t().contiguous()


def code_offset(scheme: QuantScheme) -> int:
    """What to add to an internal code to get the stored unsigned code (0 for asymmetric)."""
    return 1 << (scheme.bits - 1) if scheme.symmetric else 0


def to_stored(q: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Internal codes (unsigned asym / signed sym) -> stored unsigned codes, int16."""
    return (q.to(torch.int16) + code_offset(scheme)).to(torch.int16)


def from_stored(u: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Stored unsigned codes -> internal codes, int16."""
    return (u.to(torch.int16) - code_offset(scheme)).to(torch.int16)


def to_ct_signed(q: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Internal codes (or unsigned zero points) -> compressed-tensors' signed int8 domain."""
    return (to_stored(q, scheme) - (1 << (scheme.bits - 1))).to(torch.int8)


def from_ct_signed(q: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """compressed-tensors' signed int8 codes (or zero points) -> internal codes, int16."""
    return from_stored(q.to(torch.int16) + (1 << (scheme.bits - 1)), scheme)
