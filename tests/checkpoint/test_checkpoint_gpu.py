"""On a GPU: the fake backend on CUDA reproduces the CPU reference, and the Triton QuantLinear
reproduces a CUDA fp16 fake-quant reference through validate (skipped without a GPU)."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.checkpoint import format_report, load_quantized_model, validate_checkpoint, write_reference
from pipeline.checkpoint.reference import read_reference
from pipeline.checkpoint.writer import write_manifest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", ["w4g32sym", "w4g32asym", "w3g64asym"])
def test_fake_backend_on_cuda_matches_cpu_reference(name, written):
    r = validate_checkpoint(written[name], backend="fake", device="cuda")
    assert r.ok, format_report(r)


@pytest.mark.parametrize("name", ["w4g32sym", "w4g32asym", "w3g64asym"])
def test_triton_backend_on_cuda(name, written, tmp_path):
    ckpt = tmp_path / name
    shutil.copytree(written[name], ckpt)
    ref = read_reference(ckpt)
    fake = load_quantized_model(ckpt, backend="fake", dtype=torch.float16, device="cuda")
    with torch.no_grad():
        logits = [
            fake(**{k: v.to("cuda", torch.float16) if v.is_floating_point() else v.to("cuda") for k, v in x.items()},
                 use_cache=False).logits.float().cpu()
            for x in ref.inputs
        ]  # fmt: skip
    write_reference(ckpt, ref.inputs, logits, model_dtype=torch.float16)
    write_manifest(ckpt)
    r = validate_checkpoint(ckpt, backend="triton", device="cuda")
    print(format_report(r))
    assert r.ok, format_report(r)
    assert r.check("outputs").numbers["top1_agreement"] >= 0.99
