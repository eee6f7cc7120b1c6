"""build_model / build_layers straight onto a CUDA device, in bf16 (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import FAMILIES, adapter, chat_inputs, tiny, no_grad_one_thread  # noqa: F401 (fixtures)

from pipeline.models.layer_io import capture_layer_io
from pipeline.models.loading import build_layers, build_model
from pipeline.models.weights import open_source
from pipeline.quant.types import layer_forward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _to(inputs: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_build_on_cuda_bf16(tiny, family):
    model, processor = tiny.model(family)
    a = adapter(family)
    src = open_source(tiny.saved(family))
    built = build_model(src, a, dtype=torch.bfloat16, device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in built.parameters())
    assert all(b.device.type == "cuda" for b in built.buffers())
    inputs = chat_inputs(processor, seeds=(81,), sizes=((45, 57),))
    got = built(**_to(inputs, "cuda", torch.bfloat16)).logits.float().cpu()
    ref = model(**inputs).logits
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 0.05, float(err)
    # fp32 on the GPU: a decoder layer built alone replays its captured input like the CPU model
    ins, outs, kw = capture_layer_io(model, model.get_submodule(a.layers_path), inputs)
    (layer,) = build_layers(src, a, [1], dtype=torch.float32, device="cuda")
    kw_cuda = {k: (v.cuda() if torch.is_tensor(v) else tuple(t.cuda() for t in v) if isinstance(v, tuple) else v)
               for k, v in kw.items()}
    y = layer_forward(layer, ins[1][0].cuda(), kw_cuda).cpu()
    torch.testing.assert_close(y, outs[1][0], rtol=2e-3, atol=2e-4)
