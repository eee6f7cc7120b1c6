"""A packed checkpoint read as a WeightSource, and validation one decoder layer at a time."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.checkpoint import write_reference
from pipeline.checkpoint.loader import iter_quantized
from pipeline.checkpoint.reference import read_reference
from pipeline.checkpoint.source import CheckpointSource
from pipeline.checkpoint.validate import check_outputs
from pipeline.checkpoint.writer import write_manifest


@pytest.mark.parametrize("scheme", ["w4g32asym", "w4g32sym", "w3g64asym"])
def test_reads_as_the_original_names_with_dequantized_weights(written, source, scheme):
    ck = CheckpointSource(written[scheme])
    assert sorted(ck.keys()) == sorted(source.keys())
    assert "quantization_config" not in ck.config_dict
    deq = {m: qw.dequantize(torch.float32) for m, qw, _ in iter_quantized(written[scheme])}
    assert deq
    for k in ck.keys():
        got = ck.get(k)
        assert tuple(got.shape) == ck.shape(k) == source.shape(k), k
        mod = k[: -len(".weight")]
        if mod in deq:
            assert torch.equal(got, deq[mod]), k
        else:
            assert torch.equal(got, source.get(k)), k  # untouched tensors come back bit for bit


@pytest.mark.parametrize("scheme", ["w4g32asym", "w3g64asym"])
def test_streamed_validation_passes_a_good_checkpoint(written, scheme):
    res = check_outputs(written[scheme], stream=True)
    assert res.status == "pass", res.message
    assert res.numbers["streamed"] is True
    whole = check_outputs(written[scheme], stream=False)
    assert whole.status == "pass"
    assert res.numbers["max_abs_diff"] == pytest.approx(whole.numbers["max_abs_diff"], abs=1e-5)


def test_streamed_validation_catches_wrong_outputs(written, tmp_path):
    ck = tmp_path / "ckpt"
    shutil.copytree(written["w4g32asym"], ck)
    ref = read_reference(ck)
    g = torch.Generator().manual_seed(1)
    bumped = [lg + 0.01 * lg.abs().max() * torch.randn(lg.shape, generator=g) for lg in ref.logits]
    write_reference(ck, ref.inputs, bumped)
    write_manifest(ck)
    res = check_outputs(ck, stream=True)
    assert res.status == "fail" and res.numbers["max_rel_diff"] > res.numbers["rtol"]
