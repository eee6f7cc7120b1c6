"""Learned rounding (AdaRound-style) on a fixed quantization grid, as pure pieces.

A weight is kept on the grid its starting quantizer chose (RTN, or AWQ/MBQ scales): same ``scale``
and ``zero``; only the choice between ``floor(W/scale)`` and ``floor(W/scale) + 1`` is learned:
``W_soft = scale * (clamp(floor(W/scale) + h(V) + zero, qmin, qmax) - zero)`` with the rectified
sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1:
the stretch lets h reach exactly 0 and 1 with finite V). The regularizer
``1 - |2h - 1|^beta`` is 0 only at h in {0, 1}; beta anneals from 20 (flat: lets h move) to 2
(pushes hard) after a warm-up without it. At the end ``h >= 0.5`` becomes the rounding bit, so
every code is floor or ceil of ``W/scale`` (clamped to the code range) and packs like RTN codes.
"""

from __future__ import annotations

import math

import torch

from .quantizer import QuantizedWeight, QuantScheme, _grouped, fake_quantize_activations

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """V with ``rectified_sigmoid(V) == h`` for h in (0, 1) (clamped away from 0/1 so V is finite)."""
    h = h.clamp(eps, 1 - eps)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of ``1 - |2h - 1|^beta``: 0 iff every h is 0 or 1, 1 at h = 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def beta_schedule(it: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """beta at iteration ``it`` (0-based): None during the warm-up (regularizer off), then linear
    from ``start`` to ``end`` over the remaining iterations."""
    w = int(math.ceil(warmup * iters))
    if it < w:
        return None
    span = max(iters - w - 1, 1)
    frac = min(max((it - w) / span, 0.0), 1.0)
    return start + (end - start) * frac


class LearnedRounding(torch.nn.Module):
    """The learnable rounding of one Linear weight on a given grid (scale, zero from the start)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme):
        super().__init__()
        self.scheme = scheme
        self.shape = tuple(weight.shape)
        self.out_dtype = weight.dtype
        s = scale.float().unsqueeze(-1)
        wg = _grouped(weight.detach().float(), scheme) / s
        base = torch.floor(wg)
        zf = torch.zeros_like(s) if zero is None else zero.float().unsqueeze(-1)
        self.v = torch.nn.Parameter(inverse_rectified_sigmoid(wg - base))
        del wg
        # floor(W / scale) + zero, grouped [out, ng, g]; int16 holds it (|W / scale| is <= 2^b + 1)
        self.register_buffer("base", (base + zf).clamp(-(2**15), 2**15 - 1).to(torch.int16))
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("scale_f", s)
        self.register_buffer("zero_f", zf)
        self.zero = None if zero is None else zero.detach().clone()

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def soft_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * (clamp(base + h(V), qmin, qmax) - zero)`` in ``dtype``; saves only V for backward."""
        w = _SoftWeight.apply(self.v, self.base, self.scale_f, self.zero_f, self.scheme.qmin, self.scheme.qmax,
                              dtype or self.out_dtype)
        return w.reshape(self.shape)

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """Integer codes (int16, the quantizer's domain): floor + (h >= 0.5), plus zero, clamped."""
        q = (self.base.float() + (self.h() >= 0.5).float()).clamp(self.scheme.qmin, self.scheme.qmax)
        return q.reshape(self.shape).to(torch.int16)

    @torch.no_grad()
    def hard_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quantized().dequantize(dtype or self.out_dtype)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.hard_codes(), self.scale.clone(), None if self.zero is None else self.zero.clone(),
                               self.scheme)

    @torch.no_grad()
    def soft_hard_gap(self) -> float:
        """Mean |h - round(h)|: 0 when every h is already 0 or 1."""
        h = self.h()
        return float((h - (h >= 0.5).float()).abs().mean())


class _SoftWeight(torch.autograd.Function):
    """The soft weight and its gradient w.r.t. V without keeping fp32 intermediates alive: the
    backward recomputes h from V (memory per weight: V, base int16, the output in the model dtype)."""

    @staticmethod
    def forward(ctx, v, base, scale, zero, qmin, qmax, dtype):  # noqa: D102
        q = (base.float() + rectified_sigmoid(v)).clamp_(qmin, qmax)
        ctx.save_for_backward(v, base, scale)
        ctx.qmin, ctx.qmax = qmin, qmax
        return ((q - zero) * scale).to(dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        v, base, scale = ctx.saved_tensors
        sig = torch.sigmoid(v)
        raw = sig * (ZETA - GAMMA) + GAMMA
        q = base.float() + raw.clamp(0.0, 1.0)
        live = (raw > 0) & (raw < 1) & (q >= ctx.qmin) & (q <= ctx.qmax)
        gv = grad.float() * scale * (ZETA - GAMMA) * sig * (1 - sig) * live
        return gv, None, None, None, None, None, None


def ste_quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric fake quantization with a straight-through gradient (identity)."""
    return x + (fake_quantize_activations(x, bits) - x).detach()
