"""Part files: exact round trip, atomic writes, refusal of files that are not parts."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from pipeline.checkpoint import parts as P
from pipeline.quant.quantizer import QuantScheme, quantize_weight
from pipeline.quant.types import BlockResult

PREFIX = "model.language_model.layers."


def _result(seed: int) -> BlockResult:
    g = torch.Generator().manual_seed(seed)
    sym, asym = QuantScheme(4, 32, True), QuantScheme(3, 64, False)
    quantized = {
        "3.self_attn.q_proj": quantize_weight(torch.randn(96, 128, generator=g), sym, torch.float16),
        "3.mlp.down_proj": quantize_weight(torch.randn(64, 192, generator=g), asym, torch.bfloat16),
    }
    replaced = {"3.input_layernorm.weight": torch.rand(128, generator=g) + 0.5}
    metrics = {"method": "awq", "alpha": {"qkv": 0.35}, "loss": [0.5, 0.25], "n": torch.tensor(3)}
    return BlockResult(quantized=quantized, replaced=replaced, metrics=metrics)


def test_round_trip_is_exact(tmp_path):
    res = _result(0)
    path = P.write_part(tmp_path / "block-003.safetensors", res, lambda k: PREFIX + k)
    quantized, replaced, metrics = P.read_part(path)
    assert set(quantized) == {PREFIX + k for k in res.quantized}
    for k, qw in res.quantized.items():
        got = quantized[PREFIX + k]
        assert got.scheme == qw.scheme
        assert torch.equal(got.qweight, qw.qweight)
        assert torch.equal(got.scale, qw.scale) and got.scale.dtype == qw.scale.dtype
        assert (got.zero is None and qw.zero is None) or torch.equal(got.zero, qw.zero)
    assert torch.equal(replaced[PREFIX + "3.input_layernorm.weight"], res.replaced["3.input_layernorm.weight"])
    assert metrics == {"method": "awq", "alpha": {"qkv": 0.35}, "loss": [0.5, 0.25], "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["block-003.safetensors"]  # no temp file left


def test_lazy_part_modules_equal_the_written_weights(tmp_path):
    """PartModules (the streamed reference's reader) gives each module exactly as written, from
    whichever part holds it, and the replaced tensors of all parts."""
    res0, res1 = _result(0), _result(1)
    p0 = P.write_part(tmp_path / "block_0000.safetensors", res0, lambda k: PREFIX + k)
    p1 = P.write_part(tmp_path / "block_0001.safetensors", res1, lambda k: PREFIX.replace("layers.", "other.") + k)
    lazy = P.PartModules([str(p0), str(p1)])
    assert len(lazy) == 4 and set(lazy) == {PREFIX + k for k in res0.quantized} | {
        PREFIX.replace("layers.", "other.") + k for k in res1.quantized}
    for prefix, res in ((PREFIX, res0), (PREFIX.replace("layers.", "other."), res1)):
        for k, qw in res.quantized.items():
            torch.testing.assert_close(lazy[prefix + k].dequantize(torch.float64), qw.dequantize(torch.float64),
                                       rtol=0, atol=0)
        assert torch.equal(lazy.replaced[prefix + "3.input_layernorm.weight"], res.replaced["3.input_layernorm.weight"])


def test_crashed_writer_leaves_no_part(tmp_path, monkeypatch):
    """The writer dies after writing half the bytes: the final name must not exist, nor any readable file."""

    def half_then_die(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(P, "save_file", half_then_die)
    target = tmp_path / "block-000.safetensors"
    with pytest.raises(OSError, match="disk full"):
        P.write_part(target, _result(1), lambda k: PREFIX + k)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic(tmp_path):
    """Re-writing a part (a retried block) replaces it whole."""
    target = tmp_path / "p.safetensors"
    P.write_part(target, _result(2), lambda k: PREFIX + k)
    res = _result(3)
    P.write_part(target, res, lambda k: PREFIX + k)
    q, _, _ = P.read_part(target)
    assert torch.equal(q[PREFIX + "3.self_attn.q_proj"].qweight, res.quantized["3.self_attn.q_proj"].qweight)


def test_truncated_or_foreign_files_are_refused(tmp_path):
    good = P.write_part(tmp_path / "good.safetensors", _result(4), lambda k: PREFIX + k)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(Exception):
        P.read_part(trunc)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"x": torch.randn(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a vlmq part"):
        P.read_part(foreign)


def test_name_collision_is_refused(tmp_path):
    res = _result(5)
    res.replaced["3.self_attn.q_proj.weight_scale"] = torch.randn(2)
    with pytest.raises(ValueError, match="collides"):
        P.write_part(tmp_path / "x.safetensors", res, lambda k: PREFIX + k)
