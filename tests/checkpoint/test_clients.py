"""Written checkpoints against independent readers: compressed-tensors, transformers, our loader."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest
import torch
from ckpt_helpers import SCHEMES, decoder_linears, logits_of, rtn
from safetensors.torch import load_file
from torch import nn

from pipeline.checkpoint import iter_quantized, load_quantized_model, write_checkpoint, write_part
from pipeline.errors import VlmqError
from pipeline.models.loading import build_model
from pipeline.quant.quantizer import QuantScheme
from pipeline.quant.types import BlockResult


def _all_tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_tensors_decompresses_to_our_weights(name, written, quantized, source):
    """compressed-tensors' own model-free dequantizer (config parsing + pack-quantized decompressor)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    ckpt, qws = written[name], quantized[name]
    tensors = _all_tensors(ckpt)
    # CT dequantizes in the scale dtype (the model dtype in real use): compare there, bit for bit.
    deq = CompressedTensorsDequantizer(ckpt, dtype=torch.float16).validate(dict(tensors))
    assert {k[: -len(".weight")] for k in deq if k.endswith(".weight")} >= set(qws)
    for m, qw in qws.items():
        assert torch.equal(deq[f"{m}.weight"], qw.dequantize(torch.float16)), m
    for k in source.keys():  # untouched tensors pass through unchanged
        if k[: -len(".weight")] not in qws:
            assert torch.equal(deq[k].float(), source.get(k).float()), k


def test_written_files(written, quantized, source, adapter, tiny_dir):
    ckpt, qws = written["w3g64asym"], quantized["w3g64asym"]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in ckpt.glob("*.safetensors")) == shards
    tensors = _all_tensors(ckpt)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for m in qws:
        assert f"{m}.weight" not in tensors
        assert tensors[f"{m}.weight_packed"].dtype == torch.int32
        assert tensors[f"{m}.weight_shape"].tolist() == list(source.shape(f"{m}.weight"))
    cfg = json.loads((ckpt / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["format"], q["quantization_status"]) == ("compressed-tensors", "pack-quantized", "compressed")
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"], w["type"]) == (3, False, "group", 64, "int")
    assert q["config_groups"]["group_0"]["input_activations"] is None
    # ignore = every Linear of the real model that is not quantized (computed here from the fp model)
    model = build_model(source, adapter)
    linears = {n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    assert set(q["ignore"]) == linears - set(qws) and "lm_head" in q["ignore"]
    assert set(decoder_linears(source, adapter)) == set(qws)
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (ckpt / f).read_bytes() == (tiny_dir / f).read_bytes(), f
    meta = json.loads((ckpt / "vlmq.json").read_text())
    assert meta["recipe"] == {"method": "rtn", "scheme": "w3g64asym"} and meta["quantized_linears"] == {"w3g64asym": 14}
    manifest = json.loads((ckpt / "manifest.json").read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert manifest["complete"] is True and set(manifest["files"]) == on_disk
    for rel, e in manifest["files"].items():
        data = (ckpt / rel).read_bytes()
        assert e == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_transformers_loads_symmetric_checkpoint(written, ref_logits, sample_inputs):
    """Through transformers' compressed-tensors integration (no vlmq code on the read side)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(written["w4g32sym"], dtype=torch.float32)
    for got, want in zip(logits_of(model, sample_inputs), ref_logits["w4g32sym"]):
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()


def test_transformers_asymmetric_gap_is_documented(written, ref_logits, sample_inputs):
    """METHODS.md §6: transformers allocates weight_zero_point unpacked ([out, n_groups]) and rejects
    our packed tensor. If a transformers release loads it, it must load it *right*: then this test
    demands our logits, and the README's note on the gap should be dropped."""
    from transformers import LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(written["w4g32asym"], dtype=torch.float32)
    except RuntimeError as e:
        assert "size" in str(e) and "mismatch" in str(e).lower()
        return
    for got, want in zip(logits_of(model, sample_inputs), ref_logits["w4g32asym"]):
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name", ["w4g32sym", "w3g64asym"])
def test_our_loader_round_trips(name, written, quantized, ref_logits, sample_inputs):
    got = {m: (qw, b) for m, qw, b in iter_quantized(written[name])}
    assert set(got) == set(quantized[name])
    for m, qw in quantized[name].items():
        g, bias = got[m]
        assert bias is None and g.scheme == qw.scheme
        assert torch.equal(g.qweight, qw.qweight) and torch.equal(g.scale, qw.scale)
        assert (g.zero is None) == (qw.zero is None) and (g.zero is None or torch.equal(g.zero, qw.zero))
    model = load_quantized_model(written[name], dtype=torch.float32)
    for a, b in zip(logits_of(model, sample_inputs), ref_logits[name]):
        assert torch.equal(a, b)


def test_parts_stream_into_the_same_checkpoint(tmp_path, source, adapter):
    """Gathering from per-layer part files (with a folded norm) == writing from memory, tensor for tensor."""
    scheme = QuantScheme(4, 64, False)
    qws = rtn(source, adapter, scheme, seed=9)
    norm = f"{adapter.layers_path}.1.post_attention_layernorm.weight"
    new_norm = source.get(norm) * (1.0 + torch.rand(source.shape(norm), generator=torch.Generator().manual_seed(3)))
    prefix = adapter.layers_path + "."
    parts = []
    for i in (0, 1):
        mine = {m[len(prefix) :]: qw for m, qw in qws.items() if m.startswith(f"{prefix}{i}.")}
        replaced = {norm[len(prefix) :]: new_norm} if i == 1 else {}
        parts.append(write_part(tmp_path / f"part-{i}.safetensors", BlockResult(mine, replaced, {"i": i}), lambda k: prefix + k))
    a = write_checkpoint(tmp_path / "from_parts", source, parts, max_shard_bytes=250_000)
    b = write_checkpoint(tmp_path / "from_mem", source, qws, replaced={norm: new_norm}, max_shard_bytes=250_000)
    ta, tb = _all_tensors(a), _all_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert torch.equal(ta[norm], new_norm) and not torch.equal(new_norm, source.get(norm))
    assert json.loads((a / "model.safetensors.index.json").read_text()) == json.loads(
        (b / "model.safetensors.index.json").read_text()
    )


class _FakeQuantLinear(nn.Module):
    """Stands in for kernels.QuantLinear: records its arguments, computes with the dequantized weight."""

    calls: list = []

    def __init__(self, qweight, bias, act_bits):
        super().__init__()
        self.w = nn.Parameter(qweight.dequantize(torch.float32), requires_grad=False)
        self.b = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_quantized(cls, qweight, bias, act_bits):
        cls.calls.append((qweight.scheme, act_bits))
        return cls(qweight, bias, act_bits)

    def forward(self, x):
        return nn.functional.linear(x, self.w.to(x.dtype), self.b)


def _stub_kernels(monkeypatch, **attrs) -> None:
    """Replace the ``kernels`` package for the duration of a test (it exposes QuantLinear lazily)."""
    stub = types.ModuleType("kernels")
    for k, v in attrs.items():
        setattr(stub, k, v)
    monkeypatch.setitem(sys.modules, "kernels", stub)


def test_triton_backend_swaps_in_quantlinear(monkeypatch, tmp_path, written, quantized, ref_logits, source, adapter, sample_inputs):
    _stub_kernels(monkeypatch, QuantLinear=_FakeQuantLinear)
    _FakeQuantLinear.calls = []
    model = load_quantized_model(written["w4g32sym"], backend="triton", dtype=torch.float32)
    swapped = [n for n, m in model.named_modules() if isinstance(m, _FakeQuantLinear)]
    assert set(swapped) == set(quantized["w4g32sym"])
    assert _FakeQuantLinear.calls == [(SCHEMES["w4g32sym"], 16)] * len(swapped)
    for a, b in zip(logits_of(model, sample_inputs), ref_logits["w4g32sym"]):
        assert torch.equal(a, b)
    # W4A8: the config says 8-bit dynamic per-token activations and the loader passes act_bits=8 on
    scheme = QuantScheme(4, None, True)
    w4a8 = write_checkpoint(tmp_path / "w4a8", source, rtn(source, adapter, scheme, seed=4), act_bits=8)
    ia = json.loads((w4a8 / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert ia["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                       "group_size": None, "dynamic": True}  # fmt: skip
    assert ia["weights"]["strategy"] == "channel"
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(json.loads((w4a8 / "config.json").read_text())["quantization_config"])
    acts = parsed.config_groups["group_0"].input_activations
    assert (acts.num_bits, acts.strategy, acts.dynamic, acts.symmetric) == (8, "token", True, True)
    _FakeQuantLinear.calls = []
    load_quantized_model(w4a8, backend="triton")
    assert {c for c in _FakeQuantLinear.calls} == {(scheme, 8)}


def test_triton_backend_unavailable_is_a_clear_error(monkeypatch, written):
    _stub_kernels(monkeypatch)  # a kernels package without QuantLinear
    with pytest.raises(VlmqError, match="kernels.QuantLinear"):
        load_quantized_model(written["w4g32sym"], backend="triton")


def test_mixed_precision_gets_one_group_per_scheme(tmp_path, source, quantized):
    """Layer 0 in 4-bit symmetric, layer 1 in 3-bit asymmetric: two config groups targeting exact names;
    compressed-tensors and our loader both recover every weight."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    from pipeline.checkpoint.validate import check_layout

    a, b = quantized["w4g32sym"], quantized["w3g64asym"]
    mixed = {m: (a[m] if ".layers.0." in m else b[m]) for m in a}
    ckpt = write_checkpoint(tmp_path / "mixed", source, mixed)
    groups = json.loads((ckpt / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2
    assert sorted(sorted(g["targets"]) for g in groups.values()) == sorted(
        [sorted(m for m in mixed if ".layers.0." in m), sorted(m for m in mixed if ".layers.1." in m)]
    )
    deq = CompressedTensorsDequantizer(ckpt, dtype=torch.float16).validate(_all_tensors(ckpt))
    for m, qw in mixed.items():
        assert torch.equal(deq[f"{m}.weight"], qw.dequantize(torch.float16)), m
    got = {m: qw for m, qw, _ in iter_quantized(ckpt)}
    assert {m: g.scheme for m, g in got.items()} == {m: qw.scheme for m, qw in mixed.items()}
    assert check_layout(ckpt).status == "pass"


@pytest.mark.parametrize("name", ["w4g32sym", "w3g64asym"])
def test_real_quantlinear_reproduces_the_reference(name, written):
    """The kernels package's QuantLinear (its torch fallback on CPU, Triton on GPU) through validate."""
    from pipeline.checkpoint import validate_checkpoint
    from pipeline.checkpoint.loader import load_quantized_model

    pytest.importorskip("kernels.linear")
    model = load_quantized_model(written[name], backend="triton")
    swapped = [n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"]
    assert len(swapped) == 14
    r = validate_checkpoint(written[name], backend="triton")
    assert r.check("outputs").status == "pass", r.check("outputs").message
