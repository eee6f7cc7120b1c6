"""Triton kernels for packed low-bit weights (pure torch/Triton: no Ray, no file I/O).

Public API (imported lazily, so ``import kernels`` loads neither torch nor triton):

- ``QuantLinear``: ``QuantLinear.from_quantized(qweight, bias=None, act_bits=16)``, ``forward(x)``.
- ``matmul(x, packed, bias)``: the dispatcher (on CUDA it autotunes among the CUDA-core GEMV, the
  tensor-core split-K GEMM, the dequant-tile GEMM and dequantize + cuBLAS per shape; see
  ``kernels.autotune``); ``gemv``, ``gemm``, ``gemm_dequant``, ``dequantize``, ``w4a8``,
  ``quantize_act`` for a chosen path.
- ``pack`` / ``unpack`` / ``PackedWeight``: the load-time repack (``kernels.layout``).
- ``kernels.reference``: the float64 fake-quant references.
- ``kernels.decode_ops``: fused RMSNorm / rotary + KV-cache write + attention per GQA group
  (``rope_attention``) / SiLU-mul, and ``interleave_gate_up`` for ``QuantLinear(glu=32)``, for
  graph-captured single-token decode (``vlmq bench decode``).
- ``kernels.pdl``: ``programmatic_launch()`` turns on programmatic dependent launch for the decode
  kernels launched inside it (Hopper and newer).
"""

from __future__ import annotations

_LAZY = {
    "QuantLinear": ("linear", "QuantLinear"),
    "PackedWeight": ("layout", "PackedWeight"),
    "pack": ("layout", "pack"),
    "unpack": ("layout", "unpack"),
    "matmul": ("dispatch", "matmul"),
    "gemv": ("dispatch", "gemv"),
    "gemm": ("dispatch", "gemm"),
    "w4a8": ("dispatch", "w4a8"),
    "gemm_dequant": ("dispatch", "gemm_dequant"),
    "dequantize": ("dispatch", "dequantize"),
    "quantize_act": ("dispatch", "quantize_act"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
