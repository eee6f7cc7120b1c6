"""Float64 fake-quant references every kernel is checked against (slow, exact, CPU or GPU).

They re-derive the math from the internal convention (``W = (q - zero) * scale``) instead of
calling the kernels' helpers, so a shared mistake cannot hide.
"""

from __future__ import annotations

import torch


def dequant_f64(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    """``(q - zero) * scale`` in float64, ``[out, in]``."""
    n, k = q.shape
    g = k if group_size is None else group_size
    qg = q.to(torch.float64).reshape(n, k // g, g)
    if zero is not None:
        qg = qg - zero.to(torch.float64).unsqueeze(-1)
    return (qg * scale.to(torch.float64).unsqueeze(-1)).reshape(n, k)


def weight_f64(qweight) -> torch.Tensor:
    """Dequantized weight of a ``QuantizedWeight`` in float64."""
    return dequant_f64(qweight.qweight, qweight.scale, qweight.zero, qweight.scheme.group_size)


def linear_ref(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W_hat^T + bias`` in float64 for 16-bit activations (any leading shape)."""
    w = weight_f64(qweight).to(x.device)
    y = x.to(torch.float64) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8 (METHODS.md §1): ``s = absmax / 127`` in float32,
    ``q = clamp(round(x / s), -128, 127)`` (round half to even). Returns ``(q int8, s float32 [.., 1])``."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)
    q = torch.round(xf / s).clamp(-128, 127)
    return q.to(torch.int8), s


def w4a8_ref(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A8 reference: int8 per-token activations x symmetric per-channel int weights, float64."""
    if not qweight.scheme.symmetric or qweight.scheme.group_size is not None:
        raise ValueError("W4A8 weights are symmetric and per output channel")
    qx, sx = quantize_act_int8(x)
    w = qweight.qweight.to(torch.float64).to(x.device)
    y = (qx.to(torch.float64) @ w.t()) * sx.to(torch.float64) * qweight.scale.to(torch.float64).to(x.device).reshape(-1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
