"""Plain helpers shared by the checkpoint tests (a uniquely named module: a bare
``from conftest import`` resolves to whichever conftest pytest loaded last)."""

from __future__ import annotations

import torch

from pipeline.checkpoint.reference import write_reference
from pipeline.models.loading import build_model, layer_linear_names
from pipeline.quant.quantizer import QuantizedWeight, QuantScheme, quantize_weight

SCHEMES = {
    "w4g32sym": QuantScheme(bits=4, group_size=32, symmetric=True),
    "w4g32asym": QuantScheme(bits=4, group_size=32, symmetric=False),
    "w3g64asym": QuantScheme(bits=3, group_size=64, symmetric=False),
}


def decoder_linears(source, adapter) -> list[str]:
    """Full module names of every decoder-layer Linear the adapter quantizes."""
    rels = set(layer_linear_names(adapter))
    prefix = adapter.layers_path + "."
    out = []
    for k in source.keys():
        if k.startswith(prefix) and k.endswith(".weight"):
            rel = k[len(prefix) :].split(".", 1)[1][: -len(".weight")]
            if rel in rels:
                out.append(k[: -len(".weight")])
    return out


def rtn(source, adapter, scheme: QuantScheme, seed: int = 0) -> dict[str, QuantizedWeight]:
    """RTN of every decoder Linear, with fresh random perturbations so no two tests share codes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in decoder_linears(source, adapter):
        w = source.get(m + ".weight").float()
        w = w + 0.01 * torch.randn(w.shape, generator=g)
        out[m] = quantize_weight(w, scheme, scale_dtype=torch.float16)
    return out


def fake_quant_model(source, adapter, qws: dict[str, QuantizedWeight], replaced: dict | None = None):
    """The fp model with every quantized Linear's weight replaced by its dequantized value."""
    model = build_model(source, adapter, dtype=torch.float32)
    with torch.no_grad():
        for m, qw in qws.items():
            model.get_submodule(m).weight.copy_(qw.dequantize(torch.float32))
        for name, t in (replaced or {}).items():
            mod, _, attr = name.rpartition(".")
            getattr(model.get_submodule(mod), attr).copy_(t)
    return model.eval()


def logits_of(model, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**x).logits for x in inputs]


def reference_hook(inputs, logits):
    """A writer stage_hook that stores the validation reference (as the quantize job does)."""
    return lambda staging: write_reference(staging, inputs, logits)
