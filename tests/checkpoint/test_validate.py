"""validate: passes a good checkpoint, and each check fails on the damage it exists to catch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import format_report, validate_checkpoint, write_reference
from pipeline.checkpoint.reference import read_reference
from pipeline.checkpoint.validate import check_integrity, check_layout, check_outputs
from pipeline.models.loading import build_model
from pipeline.checkpoint.writer import write_manifest


@pytest.fixture
def good(written):
    return written["w4g32asym"]


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _status(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_good_checkpoint_passes_with_numbers(good, sample_inputs):
    r = validate_checkpoint(good)
    assert r.ok, format_report(r)
    assert _status(r) == {"integrity": "pass", "layout": "pass", "outputs": "pass"}
    assert r.check("layout").numbers["quantized_linears"] == 14
    out = r.check("outputs").numbers
    assert out["samples"] == len(sample_inputs) and out["max_abs_diff"] == 0.0 and out["top1_agreement"] == 1.0
    text = format_report(r)
    assert text.splitlines()[0].endswith("OK") and "[PASS] outputs" in text


def test_flipped_byte_in_a_shard(copy):
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) - 17] ^= 0x01  # tensor data, not the header: the file still parses
    shard.write_bytes(bytes(data))
    r = validate_checkpoint(copy)
    assert not r.ok and _status(r)["integrity"] == "fail"
    assert r.check("integrity").numbers["sha256_mismatch"] == [shard.name]
    assert "FAILED" in format_report(r).splitlines()[0]


def test_missing_manifest_means_incomplete(copy):
    (copy / "manifest.json").unlink()
    r = validate_checkpoint(copy)
    assert not r.ok and _status(r)["integrity"] == "fail"
    assert "incomplete" in r.check("integrity").message


def test_unlisted_and_missing_files(copy):
    (copy / "stray.txt").write_text("x")
    (copy / "tokenizer.json").unlink()
    r = check_integrity(copy)
    nums = r.numbers
    assert r.status == "fail" and nums["unlisted"] == ["stray.txt"] and nums["missing"] == ["tokenizer.json"]


def _drop_tensor(ckpt, name: str) -> None:
    """Remove one tensor from its shard and the index, then re-hash: only the layout check can object."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = ckpt / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    write_manifest(ckpt)


def test_missing_tensor_fails_layout(copy, quantized):
    module = sorted(quantized["w4g32asym"])[3]
    _drop_tensor(copy, f"{module}.weight_zero_point")
    r = validate_checkpoint(copy)
    assert _status(r)["integrity"] == "pass" and _status(r)["layout"] == "fail" and not r.ok
    assert f"{module}.weight_zero_point missing" in r.check("layout").message
    assert _status(r)["outputs"] == "fail"  # the reload cannot build that Linear either


def test_ignored_module_that_is_quantized_fails_layout(copy, quantized):
    cfg = json.loads((copy / "config.json").read_text())
    module = sorted(quantized["w4g32asym"])[0]
    cfg["quantization_config"]["ignore"].append(module)
    (copy / "config.json").write_text(json.dumps(cfg))
    r = check_layout(copy)
    assert r.status == "fail" and module in r.message


def test_wrong_bits_in_config_fails_layout(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (copy / "config.json").write_text(json.dumps(cfg))
    r = check_layout(copy)
    assert r.status == "fail" and "weight_packed" in r.message


def test_outputs_disagreeing_with_reference_fail(copy):
    ref = read_reference(copy)
    inputs, logits = ref.inputs, ref.logits
    g = torch.Generator().manual_seed(0)
    bumped = [lg + 0.01 * lg.abs().max() * torch.randn(lg.shape, generator=g) for lg in logits]
    write_reference(copy, inputs, bumped)
    write_manifest(copy)
    r = validate_checkpoint(copy)
    assert _status(r) == {"integrity": "pass", "layout": "pass", "outputs": "fail"}
    assert r.check("outputs").numbers["max_rel_diff"] > r.check("outputs").numbers["rtol"]


def test_fidelity_against_fp_is_reported(copy, source, adapter):
    """With fp logits in the reference, the outputs check also reports KL(fp || quant) and top-1 vs fp."""
    ref = read_reference(copy)
    inputs, logits = ref.inputs, ref.logits
    fp_model = build_model(source, adapter, dtype=torch.float32)
    with torch.no_grad():
        fp = [fp_model(**x).logits for x in inputs]
    write_reference(copy, inputs, logits, fp_logits=fp)
    r = check_outputs(copy)
    assert r.status == "pass", r.message
    # independent KL: torch's kl_div over every position, in float64
    q = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in logits]).double()
    f = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in fp]).double()
    want = torch.nn.functional.kl_div(q.log_softmax(-1), f.log_softmax(-1), log_target=True, reduction="sum") / q.shape[0]
    assert r.numbers["kl_vs_fp"] == pytest.approx(want.item(), rel=1e-6) and r.numbers["kl_vs_fp"] > 0
    assert r.numbers["top1_vs_fp"] == pytest.approx((q.argmax(-1) == f.argmax(-1)).double().mean().item())


def test_no_reference_is_skipped_not_passed(copy):
    shutil.rmtree(copy / "validation")
    write_manifest(copy)
    r = validate_checkpoint(copy)
    assert _status(r)["outputs"] == "skip" and r.ok


def test_not_a_directory(tmp_path):
    r = validate_checkpoint(tmp_path / "nope")
    assert not r.ok and "not a directory" in r.checks[0].message
