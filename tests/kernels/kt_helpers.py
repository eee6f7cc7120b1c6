"""Shared test helpers: random quantized weights and an error bound derived from the dtypes."""

from __future__ import annotations

import torch

from pipeline.quant.quantizer import QuantScheme, QuantizedWeight, quantize_weight

EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def random_qweight(n: int, k: int, bits: int, group: int | None, sym: bool, dtype: torch.dtype,
                   gen: torch.Generator) -> QuantizedWeight:
    """RTN of a random matrix with a few outlier rows, so scales and zero points vary."""
    w = torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))
    w += 0.3 * torch.randn(n, 1, generator=gen)  # shifts the range: zero points differ per row
    return quantize_weight(w, QuantScheme(bits, group, sym), dtype)


def random_x(m: int, k: int, dtype: torch.dtype, gen: torch.Generator, device: str) -> torch.Tensor:
    return (torch.randn(m, k, generator=gen) * 2).to(dtype).to(device)


def assert_matches(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w64: torch.Tensor,
                   dtype: torch.dtype, slack: float = 2.0) -> None:
    """Every element within ``slack * eps * (|ref| + |x| @ |W|^T)`` of the float64 reference.

    That is the error of rounding the output (and, for tensor-core paths, the dequantized weight)
    to ``dtype`` once; fp32 accumulation adds far less. NaN (an unwritten poisoned output) fails.
    """
    y64 = y.double().cpu()
    ref = ref.double().cpu()
    scale = x.double().abs().cpu() @ w64.abs().t().cpu()
    bound = slack * EPS[dtype] * (ref.abs() + scale) + 1e-6
    err = (y64 - ref).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements off; worst err {float(err.max()):.3g}, "
        f"at {tuple(int(i) for i in torch.nonzero(bad)[0])}, bound there {float(bound[bad][0]):.3g}"
    )


def attention_case(b: int, hq: int, hkv: int, d: int, length: int, pos: int, gen: torch.Generator, device):
    """Random fp16 qkv row(s), rotary frequencies and K/V caches at position ``pos``, and what the two
    separate launches (``rope_kv`` then ``decode_attention``) give: ``(qkv, inv_freq, p, k, v, want,
    k_ref, v_ref)`` with ``k``/``v`` untouched copies for the launch under test and ``k_ref``/``v_ref``
    the caches as the reference left them."""
    from kernels.decode_ops import decode_attention, rope_kv

    qkv = (torch.randn(b, (hq + 2 * hkv) * d, generator=gen) * 2).half().to(device)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(device)
    kc = torch.randn(b, hkv, length, d, generator=gen).half().to(device)
    vc = torch.randn(b, hkv, length, d, generator=gen).half().to(device)
    p = torch.tensor([pos], dtype=torch.int32, device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    want = decode_attention(rope_kv(qkv, inv_freq, p, kc, vc, hq, hkv), kc, vc, p)
    return qkv, inv_freq, p, kc2, vc2, want, kc, vc
