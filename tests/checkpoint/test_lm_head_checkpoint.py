"""A checkpoint whose lm_head is packed like the decoder Linears (``--quantize-lm-head``): the
writer, validate, our loader, transformers' own loader, and the kernels on a vocabulary that is
no multiple of any tile."""

import json

import pytest
import torch

from pipeline.checkpoint import write_checkpoint
from pipeline.checkpoint.loader import load_quantized_model
from pipeline.checkpoint.validate import check_layout, validate_checkpoint
from pipeline.quant.quantizer import QuantScheme, quantize_weight

from ckpt_helpers import fake_quant_model, logits_of, reference_hook, rtn  # noqa: E402

SCHEME = QuantScheme(4, 32, True)  # symmetric: transformers' compressed-tensors path loads it


@pytest.fixture(scope="module")
def head_ckpt(tmp_path_factory, source, adapter, sample_inputs):
    """Every decoder Linear and the lm_head in W4 g32 sym, with the fake-quant reference stored."""
    qws = rtn(source, adapter, SCHEME, seed=7)
    qws[adapter.lm_head_path] = quantize_weight(source.get(f"{adapter.lm_head_path}.weight"), SCHEME, torch.float16)
    ref = logits_of(fake_quant_model(source, adapter, qws), sample_inputs)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("head") / "ckpt", source, qws,
                            stage_hook=reference_hook(sample_inputs, ref))
    return ckpt, qws, ref


def test_layout_validate_and_loaders(head_ckpt, sample_inputs):
    ckpt, qws, ref = head_ckpt
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in q["ignore"] and q["config_groups"]["group_0"]["targets"] == ["Linear"]
    layout = check_layout(ckpt)
    assert layout.status == "pass" and layout.numbers["quantized_linears"] == len(qws) == 15
    _validates_and_loads(ckpt, qws, ref, sample_inputs)


def _validates_and_loads(ckpt, qws, ref, sample_inputs):
    """validate passes; our loader reproduces the reference logits exactly (the head dequantized as
    packed); transformers' compressed-tensors integration decompresses the packed head too."""
    assert validate_checkpoint(ckpt).ok
    ours = load_quantized_model(ckpt, dtype=torch.float32)
    assert torch.equal(ours.lm_head.weight, qws["lm_head"].dequantize(torch.float32))
    for got, want in zip(logits_of(ours, sample_inputs), ref):
        assert torch.equal(got, want)
    from transformers import LlavaForConditionalGeneration

    tf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    for got, want in zip(logits_of(tf, sample_inputs), ref):
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, False), QuantScheme(3, 64, True)], ids=str)
def test_kernel_head_with_odd_vocab(scheme):
    """A real vocabulary is often no multiple of the kernels' tiles (LLaVA's 32064 is not of 128):
    QuantLinear (Triton, the interpreter on CPU) against x @ W_hat^T, for decode (M=1) and a prompt."""
    pytest.importorskip("kernels.linear")
    from kernels import QuantLinear

    g = torch.Generator().manual_seed(0)
    n, k = 517, 128
    qw = quantize_weight(torch.randn(n, k, generator=g), scheme, torch.float16)
    lin = QuantLinear.from_quantized(qw, None, 16)
    w_hat = qw.dequantize(torch.float32)
    for m in (1, 9):
        x = torch.randn(m, k, generator=g).half()
        y = lin(x).float()
        want = x.float() @ w_hat.T
        assert y.shape == (m, n)
        assert (y - want).abs().max().item() < 2e-3 * want.abs().max().item()  # fp16 output rounding
        assert torch.equal(y.argmax(-1), want.argmax(-1))


def test_head_with_its_own_scheme(tmp_path, source, adapter, sample_inputs):
    """``--lm-head-bits 8 --lm-head-group-size channel`` over W4 g32 layers (both symmetric): two
    config groups, the head's by exact name; validate, our loader and transformers' compressed-
    tensors integration all read each module in its own scheme."""
    head_scheme = QuantScheme(8, None, True)
    qws = rtn(source, adapter, SCHEME, seed=11)
    qws[adapter.lm_head_path] = quantize_weight(source.get(f"{adapter.lm_head_path}.weight"), head_scheme,
                                                torch.float16)
    ref = logits_of(fake_quant_model(source, adapter, qws), sample_inputs)
    ckpt = write_checkpoint(tmp_path / "ckpt", source, qws, stage_hook=reference_hook(sample_inputs, ref))
    groups = json.loads((ckpt / "config.json").read_text())["quantization_config"]["config_groups"]
    by_target = {tuple(g["targets"]): g["weights"] for g in groups.values()}
    assert by_target[("lm_head",)]["num_bits"] == 8 and by_target[("lm_head",)]["strategy"] == "channel"
    assert len(by_target) == 2 and sorted(len(t) for t in by_target) == [1, 14]
    _validates_and_loads(ckpt, qws, ref, sample_inputs)
