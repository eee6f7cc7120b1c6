"""SmoothQuant's scales are the formula; at W4A8 the MBQ search beats it on planted outliers."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models.base import LLAMA_LIKE_GROUPS
from pipeline.quant.apply import apply_fake_quant
from pipeline.quant.mbq import search_mbq
from pipeline.quant.quantizer import fake_quantize_activations, quantize_weight
from pipeline.quant.rtn import search_rtn
from pipeline.quant.smoothquant import search_smoothquant
from pipeline.quant.types import BlockCalib, layer_forward
from scale_layers import calib, decoder_layer, samples, settings

W4A8 = dict(bits=4, group=None, sym=True, abits=8)


def _inputs(layer, smps, path):
    got = []
    h = layer.get_submodule(path).register_forward_hook(lambda m, a, o: got.append(a[0][0]))
    with torch.no_grad():
        for s in smps:
            layer_forward(layer, s.hidden, s.layer_kwargs)
    h.remove()
    return torch.cat(got)


@pytest.mark.parametrize("alpha", [0.5, 0.75])
def test_scales_are_the_formula(alpha):
    layer, cfg = decoder_layer("llama", seed=4, dtype=torch.float64, outliers=3)
    smps = samples(cfg, n=2, tokens=24, seed=int(torch.randint(0, 1000, ())), dtype=torch.float64)
    st = settings(**W4A8, alpha=alpha)
    res = search_smoothquant([layer], [2], BlockCalib(smps), st)
    for g in LLAMA_LIKE_GROUPS:
        x = _inputs(layer, smps, g.linears[0])
        w = torch.cat([layer.get_submodule(n).weight.detach() for n in g.linears])
        s = x.abs().max(0).values ** alpha / w.abs().max(0).values ** (1 - alpha)  # per input channel
        if g.prev_op.endswith("layernorm"):
            norm = layer.get_parameter(f"{g.prev_op}.weight").detach()
            assert torch.allclose(res.replaced[f"2.{g.prev_op}.weight"], norm / s, rtol=1e-12, atol=0)
        else:  # o_proj / down_proj feed nothing else: their codes are RTN of W * s
            name = g.linears[0]
            want = quantize_weight(layer.get_submodule(name).weight.detach() * s, st.scheme, st.scale_dtype)
            assert torch.equal(res.quantized[f"2.{name}"].qweight, want.qweight)
    assert res.metrics["layers"]["2"]["qkv"]["alpha"] == alpha
    assert "loss_clip" not in res.metrics["layers"]["2"]["qkv"]  # no clip search


def _w4a8_layer_error(layer, res, smps) -> float:
    """Layer output MSE with fake-quant weights and per-token int8 inputs of every Linear."""
    q = copy.deepcopy(layer)
    apply_fake_quant(q, {k.split(".", 1)[1]: v for k, v in res.quantized.items()},
                     {k.split(".", 1)[1]: v for k, v in res.replaced.items()})
    for g in LLAMA_LIKE_GROUPS:
        for n in g.linears:
            q.get_submodule(n).register_forward_pre_hook(lambda m, a: (fake_quantize_activations(a[0], 8),))
    with torch.no_grad():
        return sum(float((layer_forward(q, s.hidden, s.layer_kwargs)
                          - layer_forward(layer, s.hidden, s.layer_kwargs)).square().mean()) for s in smps)


def test_w4a8_mbq_error_at_most_smoothquant():
    """MBQ's searched scales beat SmoothQuant's fixed alpha = 0.5 on the loss both report, on every
    draw; on the whole layer's output (through attention, which neither search sees) they win on
    average: over 1000 seeds the error ratio to SmoothQuant is 0.54 +- 0.17 (to RTN 0.41 +- 0.14),
    but ~2% of single draws lose (worst 1.2x), so the layer claim is checked over 4 fresh draws."""
    ratios_sq, ratios_rtn = [], []
    for _ in range(4):
        seed = int(torch.randint(0, 1000, ()))
        layer, cfg = decoder_layer("llama", seed=seed, outliers=4)
        smps = samples(cfg, n=3, tokens=48, seed=seed + 1, all_weighted=True)
        sq = search_smoothquant([layer], [0], BlockCalib(smps), settings(**W4A8))
        mbq = search_mbq([layer], [0], calib(smps, 1.0, 1.0), settings(**W4A8, loss="mse", grid=10))
        rtn = search_rtn([layer], [0], None, settings(**W4A8))
        # the same norm: with r = 1, MSE and only answer/vision tokens, both report the plain MSE
        msq, mmbq = sq.metrics["layers"]["0"], mbq.metrics["layers"]["0"]
        groups = ("qkv", "o", "gate_up", "down")
        for g in groups:
            assert mmbq[g]["loss_rtn"] == pytest.approx(msq[g]["loss_rtn"], rel=1e-6)
        assert sum(mmbq[g]["loss_final"] for g in groups) <= sum(msq[g]["loss_final"] for g in groups), seed
        e_sq, e_mbq, e_rtn = (_w4a8_layer_error(layer, r, smps) for r in (sq, mbq, rtn))
        ratios_sq.append(e_mbq / e_sq)
        ratios_rtn.append(e_mbq / e_rtn)
    assert sum(ratios_sq) / 4 < 0.9 and sum(ratios_rtn) / 4 < 0.8, (ratios_sq, ratios_rtn)
