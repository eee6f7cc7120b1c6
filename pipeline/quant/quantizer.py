"""The group-wise integer quantizer every method, the checkpoint and every kernel agree on.

Conventions (METHODS.md §1), chosen so that all paths give bit-identical weights:
- Asymmetric: the range is widened to include 0 (as compressed-tensors' observer does), so the
  zero point is always representable and a constant group is reproduced exactly.
  ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)`` in ``[0, 2^b - 1]``,
  ``q = clamp(round(W / scale) + zero, 0, 2^b - 1)`` (unsigned domain).
- Symmetric: ``scale = absmax / (2^(b-1) - 1)``, ``q = clamp(round(W / scale), -2^(b-1), 2^(b-1) - 1)``
  (signed domain, no zero point).
- The scale is rounded to its storage dtype (the model's 16-bit dtype) *before* ``q`` is computed,
  and dequantization is ``(q - zero) * scale`` computed exactly in fp32, so the fake-quant
  reference, the packed checkpoint and the kernels agree to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)  # or None: one group per output row ("per-channel")
_SCALE_FLOOR = 1e-8


@dataclass(frozen=True)
class QuantScheme:
    """How one weight matrix is quantized."""

    bits: int = 4
    group_size: int | None = 128  # None: per output channel
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def group_len(self, in_features: int) -> int:
        g = in_features if self.group_size is None else self.group_size
        if in_features % g:
            raise ValueError(f"group size {g} does not divide in_features {in_features}")
        return g

    def n_groups(self, in_features: int) -> int:
        return in_features // self.group_len(in_features)


@dataclass
class QuantizedWeight:
    """One quantized Linear weight in the internal convention (see module docstring).

    ``qweight`` is int16 ``[out, in]`` (unsigned domain when asymmetric, signed when symmetric);
    ``scale`` ``[out, n_groups]`` in the storage dtype; ``zero`` int16 ``[out, n_groups]`` or None.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero, self.scheme, dtype or self.scale.dtype)


def _div(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x / d`` correctly rounded on every device: CUDA turns division by a Python scalar into a
    multiply by its reciprocal (1 ulp off the CPU); a 0-dim tensor divisor keeps true division."""
    return x / torch.tensor(float(d), dtype=x.dtype, device=x.device)


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    out_f, in_f = w.shape
    g = scheme.group_len(in_f)
    return w.reshape(out_f, in_f // g, g)


def compute_qparams(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale ``[out, n_groups]`` (in ``scale_dtype``, default ``w.dtype``) and zero (int16) or None."""
    scale_dtype = scale_dtype or w.dtype
    wg = _grouped(w.detach().float(), scheme)
    if scheme.symmetric:
        absmax = wg.abs().amax(dim=-1)
        scale = _div(absmax, scheme.qmax).clamp(min=_SCALE_FLOOR)
        scale = _round_scale(scale, scale_dtype)
        return scale, None
    wmax = wg.amax(dim=-1).clamp(min=0)
    wmin = wg.amin(dim=-1).clamp(max=0)
    scale = _div(wmax - wmin, scheme.qmax).clamp(min=_SCALE_FLOOR)
    scale = _round_scale(scale, scale_dtype)
    zero = torch.round(-wmin / scale.float()).clamp(0, scheme.qmax).to(torch.int16)
    return scale, zero


def _round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to storage dtype without letting a scale underflow to 0 (fp16 has subnormals
    down to 2^-24, well above the fp32 floor)."""
    fi = torch.finfo(dtype)
    return scale.clamp(min=fi.smallest_normal * fi.eps).to(dtype)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Integer codes int16 ``[out, in]`` for given qparams."""
    wg = _grouped(w.detach().float(), scheme)
    q = torch.round(wg / scale.float().unsqueeze(-1))
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    q = q.clamp(scheme.qmin, scheme.qmax)
    return q.reshape(w.shape).to(torch.int16)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero) * scale``, exact in fp32, then cast to ``dtype``."""
    qg = _grouped(q.float(), scheme)
    if zero is not None:
        qg = qg - zero.float().unsqueeze(-1)
    w = qg * scale.float().unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def quantize_weight(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of one weight matrix."""
    scale, zero = compute_qparams(w, scheme, scale_dtype)
    return QuantizedWeight(quantize(w, scale, zero, scheme), scale, zero, scheme)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize then dequantize, keeping ``w``'s dtype: the reference for every packed path."""
    return quantize_weight(w, scheme, scale_dtype).dequantize(w.dtype)


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token symmetric quantization (W4A8 / W8A8 activations): ``s = absmax / qmax``."""
    qmax = 2 ** (bits - 1) - 1
    s = _div(x.detach().abs().amax(dim=-1, keepdim=True).float(), qmax).clamp(min=_SCALE_FLOOR)
    q = torch.round(x.float() / s).clamp(-qmax - 1, qmax)
    return (q * s).to(x.dtype)
