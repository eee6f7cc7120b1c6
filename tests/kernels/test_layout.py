"""The load-time repack: bit positions as documented, exact round trip, padding."""

import pytest
import torch

from kernels.layout import field_plan, pack, pack_codes, unpack, unpack_codes

from kt_helpers import random_qweight


def test_4bit_words_are_lsb_first():
    u = torch.arange(8).reshape(1, 8)
    assert pack_codes(u, 4).tolist() == [[0x76543210]]
    w = pack_codes(torch.tensor([[15] * 8]), 4)
    assert w.tolist() == [[-1]]  # 0xFFFFFFFF as int32


def test_3bit_chunk_layout():
    """Values 0-9 in word A, 10-19 in B, 20-29 in C (2i at bit 3i, 2i+1 at bit 16+3i); value 30
    takes bit 15 of A, B, C, value 31 bit 31 (fp16-pair friendly, see layout.py)."""
    v = torch.zeros(1, 32, dtype=torch.int64)
    v[0, 1] = 5  # A bits 16-18
    v[0, 12] = 7  # B value 2 (even): bits 3-5
    v[0, 30] = 6  # 0b110: B bit 15, C bit 15
    v[0, 31] = 3  # 0b011: A bit 31, B bit 31
    a, b, c = (int(t) & 0xFFFFFFFF for t in pack_codes(v, 3)[0])
    assert a == (5 << 16) | (1 << 31)
    assert b == (7 << 3) | (1 << 15) | (1 << 31)
    assert c == (1 << 15)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_round_trip(bits, gen):
    p = field_plan(bits)
    u = torch.randint(0, 2**bits, (5, p.values_per_row * 3), generator=gen)
    assert torch.equal(unpack_codes(pack_codes(u, bits), bits), u)


def test_every_field_fits_the_fp32_mantissa():
    for bits in (2, 3, 4, 8):
        p = field_plan(bits)
        per_word = 10 if bits == 3 else p.values_per_row
        # direct fields end at bit <= 22; shifted ones too after the (kernel's) shift
        assert (p.n_direct - 1) * bits + bits <= 23
        assert per_word * bits - p.shift <= 32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group,n,k", [(32, 7, 96), (64, 33, 192), (128, 1, 256), (None, 5, 100)])
def test_pack_unpack_exact(bits, sym, group, n, k, gen):
    qw = random_qweight(n, k, bits, group, sym, torch.float16, gen)
    pw = pack(qw, tile=32)
    assert pw.k_pad % 128 == 0 and pw.k_pad >= k and pw.n_pad % 32 == 0
    q, s, z = unpack(pw)
    assert torch.equal(q, qw.qweight)
    assert torch.equal(s, qw.scale)
    assert (z is None) == sym and (z is None or torch.equal(z, qw.zero))


def test_padding_is_zero_codes(gen):
    qw = random_qweight(3, 100, 4, None, False, torch.float16, gen)
    pw = pack(qw, tile=32)
    assert int(pw.words[:, 100 // 8 + 1:, :].abs().sum()) == 0  # k beyond 104: whole zero words
    assert int(pw.words[:, :, 3:].abs().sum()) == 0  # columns beyond n


def test_rejects_bad_input(gen):
    qw = random_qweight(4, 64, 4, 32, False, torch.float16, gen)
    qw.qweight[0, 0] = 16
    with pytest.raises(ValueError, match="out of range"):
        pack(qw)
