"""Bit packing: round trips, a big-integer reference, and bit-exact agreement with compressed-tensors."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from pipeline.checkpoint.layout import compress_weight, decompress_weight, expected_layout
from pipeline.checkpoint.packing import (
    from_ct_signed,
    pack_int32,
    pack_zero_points,
    packed_len,
    to_ct_signed,
    unpack_int32,
    unpack_zero_points,
)
from pipeline.quant.quantizer import QuantScheme, quantize_weight

BITS = (2, 3, 4, 8)
LENGTHS = (1, 7, 31, 33, 97, 131)  # odd, shorter than a word group, straddling group ends


def _codes(rows: int, n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int16)


def _bigint_pack(row: list[int], bits: int) -> list[int]:
    """Reference: concatenate the row into one Python integer (element j at bit j*b), cut into 32-bit words."""
    total = sum(v << (j * bits) for j, v in enumerate(row))
    words = []
    for k in range(packed_len(len(row), bits)):
        w = (total >> (32 * k)) & 0xFFFFFFFF
        words.append(w - (1 << 32) if w >= 1 << 31 else w)
    return words


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_bigint_reference_and_round_trips(bits):
    for i, n in enumerate(LENGTHS):
        q = _codes(3, n, bits, seed=100 * bits + i)
        packed = pack_int32(q, bits)
        assert packed.dtype == torch.int32 and packed.shape == (3, packed_len(n, bits))
        for r in range(3):
            assert packed[r].tolist() == _bigint_pack(q[r].tolist(), bits), (bits, n, r)
        assert torch.equal(unpack_int32(packed, bits, n), q)


def test_hand_worked_3bit_straddle():
    # Eleven 3-bit values 1..7,1..4: value 10 (=4, 0b100) starts at bit 30: its low two bits (00) end word 0,
    # its high bit (1) is bit 0 of word 1.
    vals = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4]], dtype=torch.int16)
    word0 = sum(v << (3 * j) for j, v in enumerate([1, 2, 3, 4, 5, 6, 7, 1, 2, 3]))  # bits 0..29
    assert pack_int32(vals, 3).tolist() == [[word0, 1]]
    vals[0, 10] = 7  # 0b111: bits 30, 31 of word 0 set (sign bit), bit 0 of word 1 set
    assert pack_int32(vals, 3).tolist() == [[word0 + (3 << 30) - (1 << 32), 1]]


@pytest.mark.parametrize("bits", BITS)
def test_bit_exact_with_compressed_tensors(bits):
    for i, n in enumerate((33, 96, 131)):
        q = _codes(5, n, bits, seed=7 * bits + i)
        signed = (q - (1 << (bits - 1))).to(torch.int8)  # compressed-tensors' signed domain
        theirs = pack_to_int32(signed, bits)
        ours = pack_int32(q, bits)
        assert torch.equal(ours, theirs)
        back = unpack_from_int32(ours, bits, torch.Size((5, n)))
        assert torch.equal(back.to(torch.int16) + (1 << (bits - 1)), q)


@pytest.mark.parametrize("bits", BITS)
def test_zero_points_pack_along_out_like_compressed_tensors(bits):
    zero = _codes(37, 4, bits, seed=bits)  # [out, n_groups], out not a multiple of 32
    ours = pack_zero_points(zero, bits)
    assert ours.shape == (packed_len(37, bits), 4)
    theirs = pack_to_int32((zero - (1 << (bits - 1))).to(torch.int8), bits, packed_dim=0)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_zero_points(ours, bits, 37), zero)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ct_signed_conversion(symmetric):
    s = QuantScheme(bits=3, group_size=32, symmetric=symmetric)
    q = torch.arange(s.qmin, s.qmax + 1, dtype=torch.int16)
    signed = to_ct_signed(q, s)
    assert signed.dtype == torch.int8
    assert signed.tolist() == list(range(-4, 4))  # both conventions cover the signed 3-bit range once
    assert torch.equal(from_ct_signed(signed, s), q)


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_int32(torch.tensor([[0, 16]], dtype=torch.int16), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_int32(torch.tensor([[-1, 2]], dtype=torch.int16), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 40)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(4, 32, True), QuantScheme(4, 32, False), QuantScheme(3, 64, False), QuantScheme(2, None, False),
     QuantScheme(8, 128, True)],
    ids=str,
)
def test_compress_decompress_weight(scheme):
    g = torch.Generator().manual_seed(scheme.bits)
    w = torch.randn(72, 256, generator=g)
    qw = quantize_weight(w, scheme, scale_dtype=torch.bfloat16)
    stored = compress_weight(qw)
    spec = expected_layout(72, 256, scheme)
    assert set(stored) == set(spec)
    for k, (shape, dt) in spec.items():
        assert tuple(stored[k].shape) == shape and (dt is None or stored[k].dtype == dt), k
    back = decompress_weight(stored, scheme)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.scale, qw.scale)
    assert (back.zero is None) == scheme.symmetric
    if not scheme.symmetric:
        assert torch.equal(back.zero, qw.zero)
    assert torch.equal(back.dequantize(torch.float32), qw.dequantize(torch.float32))


@pytest.mark.parametrize("bits", (3, 4))
def test_row_chunking_is_invisible(bits, monkeypatch):
    """Big matrices are packed in row chunks; force tiny chunks and compare with one-shot packing."""
    import pipeline.checkpoint.packing as P

    q = _codes(23, 131, bits, seed=bits + 50)
    whole = pack_int32(q, bits)
    monkeypatch.setattr(P, "_CHUNK_ELEMS", 3 * 160)  # 3 rows per chunk, a ragged last chunk
    assert torch.equal(pack_int32(q, bits), whole)
    assert torch.equal(unpack_int32(whole, bits, 131), q)
    assert whole[22].tolist() == _bigint_pack(q[22].tolist(), bits)  # the row of the ragged last chunk
