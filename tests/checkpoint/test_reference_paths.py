"""The reference the pipeline writes (via quant.apply.apply_fake_quant, not our loader) is reproduced
by validate: W4A8 activation fake-quant, and a bf16 compute dtype with fp32 stored inputs."""

from __future__ import annotations

import torch
from ckpt_helpers import logits_of, rtn

from pipeline.checkpoint import format_report, validate_checkpoint, write_checkpoint, write_reference
from pipeline.models.loading import build_model
from pipeline.quant.apply import apply_fake_quant
from pipeline.quant.quantizer import QuantScheme


def test_w4a8_reference_is_reproduced(tmp_path, source, adapter, sample_inputs):
    qws = rtn(source, adapter, QuantScheme(4, None, True), seed=21)
    weights_only = logits_of(apply_fake_quant(build_model(source, adapter), qws, {}), sample_inputs)
    ref = logits_of(apply_fake_quant(build_model(source, adapter), qws, {}, act_bits=8), sample_inputs)
    assert not torch.equal(ref[0], weights_only[0])  # activation quantization changes the logits
    out = write_checkpoint(tmp_path / "w4a8", source, qws, act_bits=8,
                           stage_hook=lambda d: write_reference(d, sample_inputs, ref))  # fmt: skip
    r = validate_checkpoint(out)
    assert r.ok, format_report(r)
    assert r.check("outputs").numbers["max_abs_diff"] == 0.0


def test_bf16_compute_with_fp32_inputs(tmp_path, source, adapter, sample_inputs):
    qws = rtn(source, adapter, QuantScheme(4, 32, False), seed=22)
    model = apply_fake_quant(build_model(source, adapter, dtype=torch.bfloat16), qws, {})
    with torch.no_grad():  # as the pipeline does: floating inputs cast to the model dtype, logits kept in fp32
        ref = [model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}).logits.float()
               for x in sample_inputs]  # fmt: skip
    assert all(x["pixel_values"].dtype == torch.float32 for x in sample_inputs)
    out = write_checkpoint(tmp_path / "bf16", source, qws,
                           stage_hook=lambda d: write_reference(d, sample_inputs, ref, model_dtype=torch.bfloat16))  # fmt: skip
    r = validate_checkpoint(out)
    assert r.ok, format_report(r)
    nums = r.check("outputs").numbers
    assert nums["rtol"] == 3e-2 and nums["max_abs_diff"] == 0.0
