"""W4A8: per-token int8 activations x per-channel symmetric int weights, int8 dot, epilogue scales."""

import pytest
import torch

from kernels.dispatch import quantize_act, w4a8
from kernels.layout import pack
from kernels.reference import quantize_act_int8, w4a8_ref
from kernels.tuning import GemmConfig

from kt_helpers import random_qweight, random_x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_activation_quantization_bit_exact(dtype, gen, device):
    x = random_x(7, 300, dtype, gen, device)
    x[3] *= 50  # one loud token: per-token scales differ
    q, s = quantize_act(x)
    qr, sr = quantize_act_int8(x.cpu())
    assert torch.equal(s.cpu(), sr[:, 0])
    assert torch.equal(q.cpu(), qr)


def _w4a8_error_ok(y, ref, xq_abs_w):
    # int32 accumulation is exact; what remains is rounding the output to 16 bits
    err = (y.double().cpu() - ref).abs()
    assert not torch.isnan(y).any()
    assert bool((err <= 2.0**-7 * (ref.abs() + 1e-3 * xq_abs_w) + 1e-5).all()), float(err.max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fuse,trans,m", [(False, False, 19), (True, True, 3), (True, False, 5), (False, True, 2)])
def test_w4a8_matches_reference(bits, dtype, fuse, trans, m, gen, device):
    n, k = 37, 200
    qw = random_qweight(n, k, bits, None, True, dtype, gen)
    pw = pack(qw, tile=32, device=device)
    x = random_x(m, k, dtype, gen, device)
    b = torch.randn(n, generator=gen).to(dtype).to(device)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    y = w4a8(x, pw, b, out=out, cfg=GemmConfig(BM=16, BN=32, BK=64, split=2 if m < 16 else 1, trans=trans),
             fuse=fuse)
    ref = w4a8_ref(x.cpu(), qw, b.cpu())
    scale = (x.double().abs().cpu() @ qw.dequantize(torch.float64).abs().t())
    _w4a8_error_ok(y, ref, scale)


def test_w4a8_rejects_grouped_weights(gen, device):
    qw = random_qweight(8, 64, 4, 32, True, torch.float16, gen)
    with pytest.raises(ValueError, match="per-channel"):
        w4a8(random_x(1, 64, torch.float16, gen, device), pack(qw, tile=32, device=device))
