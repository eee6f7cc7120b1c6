"""Load-time repack of a ``QuantizedWeight`` into the layout the Triton kernels read.

Why a layout of our own (the file on disk stays compressed-tensors ``pack-quantized``):

- Codes are packed along ``in`` (k), one 32-bit word per (word-row, output column), and the
  words of a tile of ``T`` output columns are stored contiguously: ``words[n // T, row, n % T]``.
  A GEMV program then streams one contiguous region per column tile, and every warp-wide load
  is 512 contiguous bytes.
- Codes are unsigned: ``u = q`` (asymmetric) or ``u = q + 2^(b-1)`` (symmetric), so every kernel
  decodes the same way and folds the symmetric offset into a constant.
- Field positions are chosen so that the kernels can build floats from bits (METHODS.md §7):
  for b in {2, 4, 8} value j of a word sits at bit ``j*b`` (LSB first, as on disk);
  for b = 3, 32 values live in 3 words: values 0-9 in word A, 10-19 in B, 20-29 in C; inside a
  word value ``2i`` sits at bit ``3i`` (low half) and value ``2i + 1`` at bit ``16 + 3i`` (high
  half), i < 5; value 30 takes bit 15 of A, B, C (its bits 0, 1, 2) and value 31 bit 31.
  Every field of every layout can be OR-ed into the mantissa of ``2^23`` after at most one
  shift per word, and for b = 3 every pair of neighbours (2i, 2i+1) lands in the two fp16
  halves of a word at the same offset: one ``lop3`` builds both as fp16 (``kernels/gemv_h2.py``)
  against the pair ``(x[2i], x[2i+1])``, which is one 32-bit load of x.
- ``in`` is zero-padded to a multiple of 128 (and of the group size), ``out`` to a multiple of
  ``T``; scale and zero are stored ``[n // T, group, n % T]`` beside the words.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lcm

import torch

K_ALIGN = 128  # every kernel's k-block divides this
DEFAULT_TILE = 256  # every kernel's BN divides it
MAGIC_BITS = 0x4B000000  # float32 2^23: OR-ing an integer < 2^23 into it gives 2^23 + integer


@dataclass(frozen=True)
class FieldPlan:
    """Where field j of a word (or 3-word chunk) lives, for the decoders (and the tests)."""

    bits: int
    values_per_row: int  # values decoded from one row (word, or 3-word chunk for b=3)
    words_per_row: int  # 1, or 3 for b=3
    n_direct: int  # fields [0, n_direct) are read without a shift
    shift: int  # the others are read from (word >> shift)


def field_plan(bits: int) -> FieldPlan:
    if bits == 3:
        # per word: 10 fields at bits 0,3,..,12 and 16,19,..,28; the 7 at bits <= 19 end below
        # bit 23, the 3 above are read from w >> 18
        return FieldPlan(3, 32, 3, 7, 18)
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    n_direct = 23 // bits  # fields that end at or below bit 22 (the mantissa)
    return FieldPlan(bits, 32 // bits, 1, n_direct, n_direct * bits)


@dataclass
class PackedWeight:
    """One quantized Linear in kernel layout. Tensors live on the module's device."""

    words: torch.Tensor  # int32 [n_pad // tile, rows * words_per_row, tile]
    scale: torch.Tensor  # [n_pad // tile, n_groups_pad, tile], storage dtype (fp16/bf16/fp32)
    zero: torch.Tensor | None  # uint8, same shape as scale; None when symmetric
    bits: int
    group_size: int | None  # None: per output channel
    symmetric: bool
    in_features: int
    out_features: int
    tile: int = DEFAULT_TILE

    @property
    def plan(self) -> FieldPlan:
        return field_plan(self.bits)

    @property
    def k_pad(self) -> int:
        return self.words.shape[1] // self.plan.words_per_row * self.plan.values_per_row

    @property
    def n_pad(self) -> int:
        return self.words.shape[0] * self.tile

    @property
    def rows(self) -> int:
        """Decode rows (words, or 3-word chunks) along k."""
        return self.k_pad // self.plan.values_per_row

    @property
    def group_rows(self) -> int:
        """Decode rows per quantization group (all rows when per-channel)."""
        g = self.k_pad if self.group_size is None else self.group_size
        return g // self.plan.values_per_row

    def nbytes(self) -> int:
        z = 0 if self.zero is None else self.zero.numel() * self.zero.element_size()
        return self.words.numel() * 4 + self.scale.numel() * self.scale.element_size() + z


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _tile(t: torch.Tensor, tile: int) -> torch.Tensor:
    """[rows, n_pad] -> [n_pad // tile, rows, tile] (contiguous)."""
    rows, n_pad = t.shape
    return t.reshape(rows, n_pad // tile, tile).permute(1, 0, 2).contiguous()


def _untile(t: torch.Tensor) -> torch.Tensor:
    """[n_pad // tile, rows, tile] -> [rows, n_pad]."""
    nt, rows, tile = t.shape
    return t.permute(1, 0, 2).reshape(rows, nt * tile)


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[n, k]`` (k a multiple of values_per_row) -> words int32 ``[n, k_words]``."""
    p = field_plan(bits)
    n, k = u.shape
    u = u.to(torch.int64)
    if bits != 3:
        v = u.reshape(n, k // p.values_per_row, p.values_per_row)
        sh = torch.arange(p.values_per_row, device=u.device) * bits
        return _to_int32((v << sh).sum(-1))
    v = u.reshape(n, k // 32, 32)
    sh = _sh3(u.device)
    words = [(v[..., 10 * i:10 * i + 10] << sh).sum(-1) | (((v[..., 30] >> i) & 1) << 15)
             | (((v[..., 31] >> i) & 1) << 31) for i in range(3)]
    return _to_int32(torch.stack(words, dim=-1).reshape(n, k // 32 * 3))


def _sh3(device) -> torch.Tensor:
    """Bit position of value j (0-9) inside a 3-bit word: 2i at 3i, 2i+1 at 16+3i."""
    j = torch.arange(10, device=device)
    return 3 * (j // 2) + 16 * (j % 2)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: words ``[n, k_words]`` -> int64 codes ``[n, k]``."""
    p = field_plan(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    n = w.shape[0]
    mask = (1 << bits) - 1
    if bits != 3:
        sh = torch.arange(p.values_per_row, device=w.device) * bits
        return ((w.unsqueeze(-1) >> sh) & mask).reshape(n, -1)
    w = w.reshape(n, -1, 3)
    sh = _sh3(w.device)
    a, b, c = w[..., 0:1], w[..., 1:2], w[..., 2:3]
    v30 = sum(((w[..., i] >> 15) & 1) << i for i in range(3))
    v31 = sum(((w[..., i] >> 31) & 1) << i for i in range(3))
    vals = torch.cat([(a >> sh) & 7, (b >> sh) & 7, (c >> sh) & 7, v30[..., None], v31[..., None]], dim=-1)
    return vals.reshape(n, -1)


def pack(qweight, tile: int = DEFAULT_TILE, device: torch.device | str | None = None) -> PackedWeight:
    """Repack a ``pipeline.quant.quantizer.QuantizedWeight`` into kernel layout.

    Accepts anything with ``qweight``/``scale``/``zero``/``scheme`` (bits, group_size, symmetric).
    """
    scheme = qweight.scheme
    bits, sym = scheme.bits, scheme.symmetric
    q = qweight.qweight
    n, k = q.shape
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if tile % 16 or tile <= 0:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    device = torch.device(device) if device is not None else q.device
    g = scheme.group_size
    if g is not None and (k % g or g % 32):
        raise ValueError(f"group size {g} must be a multiple of 32 that divides in_features {k}")
    k_pad = _round_up(k, K_ALIGN if g is None else lcm(K_ALIGN, g))
    n_pad = _round_up(n, tile)
    u = q.to(torch.int64) + (2 ** (bits - 1) if sym else 0)
    if int(u.min()) < 0 or int(u.max()) >= 2**bits:
        raise ValueError(f"codes out of range for {bits}-bit {'symmetric' if sym else 'asymmetric'} weights")
    u_pad = torch.zeros(n_pad, k_pad, dtype=torch.int64, device=q.device)
    u_pad[:n, :k] = u
    words = _tile(pack_codes(u_pad, bits).t(), tile)

    ng_pad = 1 if g is None else k_pad // g
    scale = qweight.scale
    s_pad = torch.zeros(n_pad, ng_pad, dtype=scale.dtype, device=q.device)
    s_pad[:n, : scale.shape[1]] = scale
    scale_t = _tile(s_pad.t(), tile)
    zero_t = None
    if not sym:
        z_pad = torch.zeros(n_pad, ng_pad, dtype=torch.uint8, device=q.device)
        z_pad[:n, : qweight.zero.shape[1]] = qweight.zero.to(torch.uint8)
        zero_t = _tile(z_pad.t(), tile)
    return PackedWeight(
        words=words.to(device),
        scale=scale_t.to(device),
        zero=None if zero_t is None else zero_t.to(device),
        bits=bits,
        group_size=g,
        symmetric=sym,
        in_features=k,
        out_features=n,
        tile=tile,
    )


def unpack(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Back to the internal convention: ``(q int16 [n, k], scale [n, groups], zero int16 | None)``."""
    n, k = pw.out_features, pw.in_features
    u = unpack_codes(_untile(pw.words).t().contiguous(), pw.bits)[:n, :k]
    q = u - (2 ** (pw.bits - 1) if pw.symmetric else 0)
    ng = 1 if pw.group_size is None else k // pw.group_size
    scale = _untile(pw.scale).t()[:n, :ng].contiguous()
    zero = None if pw.zero is None else _untile(pw.zero).t()[:n, :ng].to(torch.int16).contiguous()
    return q.to(torch.int16), scale, zero
