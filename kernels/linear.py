"""``QuantLinear``: an ``nn.Module`` that runs a packed low-bit Linear on the Triton kernels.

The checkpoint loader builds it with ``QuantLinear.from_quantized(qweight, bias, act_bits)``.
Buffers (packed words, scales, zero points) follow ``.to(device)`` like any module; on a CPU
tensor without the Triton interpreter the forward falls back to dequantize + matmul in torch, so
a packed model still runs (slowly) anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import DEFAULT_TILE, PackedWeight, pack, unpack


class QuantLinear(nn.Module):
    """``y = x @ W_hat^T + b`` with ``W_hat = (q - zero) * scale`` stored packed."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, act_bits: int = 16, glu: int = 0):
        super().__init__()
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        if glu and (act_bits != 16 or glu % 32 or packed.out_features % (2 * glu)):
            raise ValueError(f"glu={glu} needs 16-bit activations and gate/up blocks (a multiple of 32) that "
                             f"tile out_features={packed.out_features}")
        if act_bits == 8 and (not packed.symmetric or packed.group_size is not None or packed.bits == 3):
            raise ValueError("8-bit activations need symmetric per-channel 2/4/8-bit weights (W4A8)")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.bits = packed.bits
        self.group_size = packed.group_size
        self.symmetric = packed.symmetric
        self.act_bits = act_bits
        self.tile = packed.tile
        # > 0: a fused gate/up projection, rows interleaved in blocks of ``glu`` (interleave_gate_up);
        # forward returns silu(gate) * up, out_features / 2 wide
        self.glu = glu
        self.register_buffer("words", packed.words)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("zero", packed.zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_quantized(cls, qweight, bias: torch.Tensor | None = None, act_bits: int = 16,
                       tile: int = DEFAULT_TILE, glu: int = 0) -> "QuantLinear":
        """Repack a ``pipeline.quant.quantizer.QuantizedWeight`` (kept on its device). ``glu``: the
        rows are a gate and an up projection interleaved in blocks of ``glu``
        (``kernels.decode_ops.interleave_gate_up``) and forward returns ``silu(gate) * up``."""
        from pipeline.errors import VlmqError

        s = qweight.scheme
        if act_bits == 8 and (not s.symmetric or s.group_size is not None or s.bits not in (2, 4, 8)):
            raise VlmqError(
                f"W{s.bits}A8 needs symmetric per-channel weights; got "
                f"{'symmetric' if s.symmetric else 'asymmetric'} group_size={s.group_size}",
                "quantize with symmetric: true and group_size: null (per-channel) for 8-bit activations",
            )
        if act_bits not in (8, 16):
            raise VlmqError(f"act_bits must be 8 or 16, got {act_bits}", "use 16 (weight-only) or 8 (W4A8)")
        if bias is not None and bias.shape != (qweight.shape[0],):
            raise VlmqError(f"bias has shape {tuple(bias.shape)}, expected ({qweight.shape[0]},)",
                            "pass the Linear's own bias or None")
        return cls(pack(qweight, tile=tile), bias, act_bits, glu)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.words, self.scale, self.zero, self.bits, self.group_size, self.symmetric,
                            self.in_features, self.out_features, self.tile)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (exact in fp32): the torch fallback and a debugging aid."""
        q, s, z = unpack(self.packed)
        n, k = q.shape
        g = k if self.group_size is None else self.group_size
        w = q.float().reshape(n, k // g, g)
        if z is not None:
            w = w - z.float().unsqueeze(-1)
        return (w * s.float().unsqueeze(-1)).reshape(n, k).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import dispatch

        lead = x.shape[:-1]
        n_out = self.out_features // 2 if self.glu else self.out_features
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, n_out)
        if x.device.type != "cuda" and not dispatch.interpreting():
            return self._torch_forward(x2).reshape(*lead, n_out)
        # the kernels take 16-bit activations; others (an fp32 model) run in the scale's dtype
        xk = x2 if x2.dtype in (torch.float16, torch.bfloat16) else x2.to(self._kernel_dtype())
        if self.act_bits == 8:
            y = dispatch.w4a8(xk, self.packed, self.bias)
        else:
            y = dispatch.matmul(xk, self.packed, self.bias, glu=self.glu)
        return y.to(x.dtype).reshape(*lead, n_out)

    def accumulate(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out += x @ W_hat^T (+ b)`` into a float32 ``[M, out_features]`` buffer the caller zeroes
        (the decode step, once per step for all layers): the GEMV's k-splits add straight into it,
        and the consumer rounds to 16 bits as it reads (``kernels.dispatch.gemv(accumulate=True)``)."""
        from . import dispatch

        if self.glu:
            raise ValueError("a fused gate/up QuantLinear (glu) cannot accumulate: silu-mul needs finished sums")
        x2 = x.reshape(-1, self.in_features)
        if self.act_bits != 16 or (x.device.type != "cuda" and not dispatch.interpreting()):
            return out.add_(self.forward(x2).float())
        xk = x2 if x2.dtype in (torch.float16, torch.bfloat16) else x2.to(self._kernel_dtype())
        return dispatch.matmul(xk, self.packed, self.bias, acc_out=out)

    def _kernel_dtype(self) -> torch.dtype:
        return self.scale.dtype if self.scale.dtype in (torch.float16, torch.bfloat16) else torch.float16

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if self.act_bits == 8:
            from .reference import quantize_act_int8

            q, s = quantize_act_int8(x2)
            xin = q.float() * s
        else:
            xin = x2.float()
        y = xin @ self.dequantize(torch.float32).t()
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.to(x2.dtype)
        if self.glu:
            g, u = y.float().reshape(y.shape[0], -1, 2, self.glu).unbind(2)
            y = (torch.nn.functional.silu(g) * u).reshape(y.shape[0], -1).to(x2.dtype)
        return y

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else self.group_size
        return (f"in={self.in_features}, out={self.out_features}, w{self.bits}a{self.act_bits}, group={g}, "
                f"{'sym' if self.symmetric else 'asym'}, bias={self.bias is not None}"
                + (f", glu={self.glu}" if self.glu else ""))
