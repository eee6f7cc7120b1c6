"""Every family round-trips: write (asymmetric 3-bit), validate, reload = the in-memory fake-quant model."""

from __future__ import annotations

import pytest
import torch
from ckpt_helpers import decoder_linears, fake_quant_model, logits_of, reference_hook, rtn

from pipeline.checkpoint import format_report, validate_checkpoint, write_checkpoint
from pipeline.models import detect_adapter
from pipeline.models.tiny import build_processor, save_tiny, tiny_image
from pipeline.models.weights import open_source
from pipeline.quant.quantizer import QuantScheme


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl"])
def test_family_round_trip(family, tmp_path):
    src = open_source(save_tiny(family, tmp_path / "fp", seed=2))
    adapter = detect_adapter(src.config_dict)
    qws = rtn(src, adapter, QuantScheme(3, 32, False), seed=11)
    assert len(qws) == len(decoder_linears(src, adapter)) == 14
    proc = build_processor(family)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    enc = proc(images=tiny_image(seed=5), text=proc.apply_chat_template(msgs, add_generation_prompt=True),
               return_tensors="pt")  # fmt: skip
    inputs = [{k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}]
    ref = logits_of(fake_quant_model(src, adapter, qws), inputs)
    out = write_checkpoint(tmp_path / "q", src, qws, stage_hook=reference_hook(inputs, ref))
    report = validate_checkpoint(out)
    assert report.ok, format_report(report)
    assert report.check("outputs").numbers["max_abs_diff"] == 0.0
