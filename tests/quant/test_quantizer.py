"""The quantizer against hand-worked values and a float64 re-derivation of METHODS.md §1."""

import pytest
import torch

from pipeline.quant.quantizer import (QuantScheme, compute_qparams, dequantize, fake_quantize,
                                      fake_quantize_activations, quantize_weight)


def _reference(w: torch.Tensor, bits: int, g: int | None, sym: bool, scale_dtype) -> torch.Tensor:
    """Float64 fake-quant written directly from the formulas, row by row, group by group."""
    fi = torch.finfo(scale_dtype)
    floor = fi.smallest_normal * fi.eps  # the smallest positive scale the storage dtype holds
    out = torch.empty_like(w, dtype=torch.float64)
    g = g or w.shape[1]
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            x = w[r, s:s + g].double()
            if sym:
                qmax = 2 ** (bits - 1) - 1
                scale = max(x.abs().max().item() / qmax, 1e-8, floor)
                scale = torch.tensor(scale).to(scale_dtype).double().item()
                q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax)
                out[r, s:s + g] = q * scale
            else:
                qmax = 2 ** bits - 1
                lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
                scale = max((hi - lo) / qmax, 1e-8, floor)
                scale = torch.tensor(scale).to(scale_dtype).double().item()
                zero = min(max(round(-lo / scale), 0), qmax)
                q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
                out[r, s:s + g] = (q - zero) * scale
    return out


def test_hand_worked_2bit():
    w = torch.tensor([[-1.0, 0.0, 0.25, 2.0]])
    qw = quantize_weight(w, QuantScheme(bits=2, group_size=None), torch.float32)
    # range [-1, 2] -> scale 1, zero 1; q = round(w) + 1 = [0, 1, 1, 3]
    assert qw.scale.item() == 1.0 and qw.zero.item() == 1
    assert qw.qweight.tolist() == [[0, 1, 1, 3]]
    assert qw.dequantize().tolist() == [[-1.0, 0.0, 0.0, 2.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, None])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_float64_reference(bits, group, sym, dtype):
    w = (torch.randn(8, 128) * torch.rand(8, 1) * 0.1).to(dtype)
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym)
    got = fake_quantize(w, scheme).double()
    ref = _reference(w.float(), bits, group, sym, dtype).to(dtype).double()
    assert torch.equal(got, ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_in_range_and_error_bounded(bits):
    w = torch.randn(16, 256)
    scheme = QuantScheme(bits=bits, group_size=64)
    qw = quantize_weight(w, scheme, torch.float32)
    assert qw.qweight.min() >= 0 and qw.qweight.max() <= 2**bits - 1
    assert qw.zero.min() >= 0 and qw.zero.max() <= 2**bits - 1
    err = (qw.dequantize() - w).abs().reshape(16, 4, 64)
    assert (err <= qw.scale.unsqueeze(-1) / 2 + 1e-6).all()


def test_constant_and_zero_groups_are_exact_and_finite():
    w = torch.cat([torch.full((2, 32), 0.37), torch.zeros(2, 32), -torch.full((2, 32), 5.0)], dim=1)
    for sym in (False, True):
        out = fake_quantize(w, QuantScheme(bits=4, group_size=32, symmetric=sym), torch.float32)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, w, atol=1e-6)


def test_scale_is_rounded_before_codes():
    """Codes must be computed with the stored (fp16) scale, or packed paths would disagree."""
    w = torch.randn(4, 128, dtype=torch.float32)
    scheme = QuantScheme(bits=3, group_size=128)
    scale, zero = compute_qparams(w, scheme, torch.float16)
    assert scale.dtype == torch.float16
    qw = quantize_weight(w, scheme, torch.float16)
    assert torch.equal(dequantize(qw.qweight, scale, zero, scheme), qw.dequantize(torch.float32))


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 100), QuantScheme(bits=4, group_size=32))


def test_activation_quant_per_token():
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 7.0]).unsqueeze(1)
    y = fake_quantize_activations(x, 8)
    s = x.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(y, torch.round(x / s) * s, atol=1e-6)
    assert ((y - x).abs() <= s / 2 + 1e-6).all()
