"""The lm_head, quantized like the decoder Linears (``recipe.quantize_lm_head``): RTN per group.

Why RTN and not a search: AWQ/MBQ's scale and clip searches are driven by the Linear's input
activations. The lm_head's input is the final norm's output (the norm feeds only the head, so
AWQ's scales could fold into it), but the capture pass stores decoder-layer inputs only: a
searched head would need a capture stream of its own, future work. RTN needs no data. The head
uses the job's scheme (bits, group size, symmetry), or its own bits / group size where the recipe
gives them (``--lm-head-bits``, ``--lm-head-group-size``: the head is the most sensitive Linear,
so W3 layers + a W4 head is a common choice), and the job's scale dtype, so the packed head, the
fake-quant reference and the kernels agree to the bit, exactly as for the decoder Linears.

Row chunks bound the memory: a 72B head (152k x 8192) is 5 GB in fp32 alone, and qparams are
per row, so quantizing rows in chunks gives the same codes as quantizing the whole matrix.
"""

from __future__ import annotations

import time

import torch

from .quantizer import QuantizedWeight, QuantScheme, quantize_weight
from .types import BlockResult

HEAD_CHUNK_ELEMENTS = 1 << 27  # ~0.5 GB of fp32 per chunk (plus a few same-size temporaries)


@torch.no_grad()
def quantize_lm_head(
    weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, name: str = "lm_head",
    chunk_elements: int = HEAD_CHUNK_ELEMENTS,
) -> BlockResult:
    """RTN of the lm_head weight ``[vocab, hidden]``, as a ``BlockResult`` keyed by ``name`` (the
    module's full name). Metrics: the relative Frobenius error of the dequantized weight, so the
    report shows what the head lost."""
    t0 = time.perf_counter()
    out_f, in_f = weight.shape
    scheme.group_len(in_f)  # a group size that does not divide the hidden size raises here
    rows = max(1, chunk_elements // max(1, in_f))
    q, scales, zeros = [], [], []
    err = ref = 0.0
    for r0 in range(0, out_f, rows):
        w = weight[r0:r0 + rows]
        qw = quantize_weight(w, scheme, scale_dtype)
        q.append(qw.qweight)
        scales.append(qw.scale)
        if qw.zero is not None:
            zeros.append(qw.zero)
        wf = w.double()
        err += float((qw.dequantize(torch.float64) - wf).square().sum())
        ref += float(wf.square().sum())
    qweight = QuantizedWeight(torch.cat(q), torch.cat(scales), torch.cat(zeros) if zeros else None, scheme)
    metrics = {
        "method": "rtn",
        "module": name,
        "shape": [int(out_f), int(in_f)],
        "scheme": {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric},
        "rel_weight_error": (err / ref) ** 0.5 if ref > 0 else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return BlockResult(quantized={name: qweight}, replaced={}, metrics=metrics)
