"""The layer-streamed runner equals the whole model; the overlay equals the fake-quant model."""

import pytest
import torch

from pipeline.data.collate import build_calibration_table, row_to_model_inputs
from pipeline.data.sources import open_calib_source
from pipeline.evaluate.streamed import OverlaySource, act_quant_hook, streamed_logits
from pipeline.models import detect_adapter
from pipeline.models.loading import build_model
from pipeline.models.processors import load_processor
from pipeline.models.weights import open_source
from pipeline.quant.apply import apply_fake_quant
from pipeline.quant.quantizer import QuantScheme, quantize_weight


def _samples(model_dir, adapter, n=2):
    from transformers import AutoConfig

    proc = load_processor(model_dir)
    vid = adapter.image_token_id(AutoConfig.from_pretrained(model_dir))
    table, _ = build_calibration_table(open_calib_source("builtin", num_samples=n, seed=3).rows(), proc, vid, max_rows=n)
    return [row_to_model_inputs(table, i) for i in range(n)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl", "llava_onevision", "qwen2_5_vl"])
def test_streamed_equals_whole_model(tiny_dirs, family):
    d = tiny_dirs[family]
    source = open_source(d)
    adapter = detect_adapter(source.config_dict)
    samples = _samples(d, adapter)
    model = build_model(source, adapter, dtype=torch.float32)
    with torch.no_grad():
        want = [model(**s, use_cache=False).logits[0] for s in samples]
    got = streamed_logits(source, adapter, samples, torch.float32, "cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_bits", [16, 8])
def test_overlay_equals_fake_quant_model(tiny_dirs, act_bits):
    d = tiny_dirs["llava"]
    source = open_source(d)
    adapter = detect_adapter(source.config_dict)
    samples = _samples(d, adapter)
    scheme = QuantScheme(4, None, True) if act_bits == 8 else QuantScheme(3, 64)
    prefix = adapter.layers_path + "."
    quantized = {k[:-7]: quantize_weight(source.get(k) + 0.01 * torch.randn(source.shape(k)), scheme, torch.float16)
                 for k in source.keys() if k.startswith(prefix) and k.endswith("proj.weight")}
    norm = f"{prefix}1.input_layernorm.weight"
    replaced = {norm: source.get(norm) * (1 + 0.1 * torch.rand(source.shape(norm)))}
    model = apply_fake_quant(build_model(source, adapter, dtype=torch.float32), quantized, replaced, act_bits=act_bits)
    with torch.no_grad():
        want = [model(**s, use_cache=False).logits[0] for s in samples]
    got = streamed_logits(OverlaySource(source, quantized, replaced), adapter, samples, torch.float32, "cpu",
                          layer_hook=act_quant_hook(act_bits))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
