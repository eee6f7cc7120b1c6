"""Q-VLM block reconstruction: learned rounding against RTN on toy decoder blocks with planted
outliers, the rounding pieces against closed forms, and the MBQ-weighted variant."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from pipeline.models.base import LLAMA_LIKE_GROUPS
from pipeline.quant import get_search
from pipeline.quant.adaround import (LearnedRounding, beta_schedule, inverse_rectified_sigmoid,
                                     rectified_sigmoid, rounding_regularizer, ste_quantize_activations)
from pipeline.quant.qvlm import (code_agreement, error_count, error_terms, run_block, search_on_top,
                                 search_qvlm, token_weights, vision_ratio_for)
from pipeline.quant.quantizer import (QuantScheme, compute_qparams, fake_quantize_activations, quantize,
                                      quantize_weight)
from pipeline.quant.rtn import search_rtn
from pipeline.quant.types import BlockCalib, Sample, SearchSettings

OUTLIERS = (3, 17)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared 2-core box: one thread avoids OpenMP oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_toy_block(n_layers=2, hidden=64, inter=128, n_samples=4, T=24, seed=0):
    """Llama decoder layers with random weights and planted outliers: two norm channels x20, and
    inputs with a large channel mean on those channels plus low-rank correlated structure (real
    LLM activations are correlated across channels; with iid channels RTN is already optimal)."""
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=256)
    layers = [LlamaDecoderLayer(cfg, i).eval() for i in range(n_layers)]
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * hidden**-0.5
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[list(OUTLIERS)] *= 20.0
    rope = LlamaRotaryEmbedding(cfg)
    mu = torch.randn(hidden, generator=g) * 0.5
    mu[list(OUTLIERS)] = torch.tensor([8.0, -6.0])
    mix = torch.randn(8, hidden, generator=g)
    samples = []
    for _ in range(n_samples):
        x = mu + 0.5 * torch.randn(T, 8, generator=g) @ mix + 0.2 * torch.randn(T, hidden, generator=g)
        pos = torch.arange(T)[None]
        cos, sin = rope(x[None], pos)
        vis = torch.zeros(T, dtype=torch.bool)
        vis[2: T // 2] = True
        ans = torch.zeros(T, dtype=torch.bool)
        ans[3 * T // 4:] = True
        samples.append(Sample(x, {"position_embeddings": (cos, sin), "position_ids": pos}, vis, ans))
    return layers, samples


def settings(bits=3, group=32, abits=16, **options):
    base = dict(iters=120, lr=1e-2, batch_size=4, round_lambda=1e4)
    base.update(options)
    return SearchSettings(QuantScheme(bits, group), LLAMA_LIKE_GROUPS, torch.float16, abits=abits, options=base)


@torch.no_grad()
def block_mse(layers, layer_ids, samples, quantized, replaced=None, abits=16) -> float:
    """Independent check: load the weights into copies of the layers and run them plainly."""
    qlayers = copy.deepcopy(layers)
    for layer, idx in zip(qlayers, layer_ids):
        for name, t in (replaced or {}).items():
            i, rel = name.split(".", 1)
            if int(i) == idx:
                layer.get_parameter(rel).data.copy_(t)
        for name, qw in quantized.items():
            i, rel = name.split(".", 1)
            if int(i) == idx:
                layer.get_submodule(rel).weight.data.copy_(qw.dequantize(torch.float32))
    hooks = []
    if abits < 16:
        for layer in qlayers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    hooks.append(m.register_forward_pre_hook(lambda _m, a: (fake_quantize_activations(a[0], abits),)))
    sq = n = 0.0
    for s in samples:
        d = run_block(qlayers, s.hidden, s.layer_kwargs) - run_block(layers, s.hidden, s.layer_kwargs)
        sq += float(d.double().square().sum())
        n += d.numel()
    for h in hooks:
        h.remove()
    return sq / n


# ------------------------------------------------------------------------------- rounding pieces


def test_rectified_sigmoid_and_inverse():
    h = torch.tensor([0.01, 0.25, 0.5, 0.9, 0.999])
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, rtol=0, atol=1e-6)
    # sigmoid(0) * 1.2 - 0.1 = 0.5; the stretch reaches exactly 0 and 1 at finite V
    assert rectified_sigmoid(torch.tensor([0.0, -3.0, 3.0])).tolist() == [0.5, 0.0, 1.0]


def test_regularizer_closed_form():
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_regularizer(torch.tensor([0.5]), 20.0)) == 1.0
    # h = 0.75, beta = 2: 1 - 0.5^2 = 0.75; h = 0.25, beta = 3: 1 - 0.5^3 = 0.875
    assert float(rounding_regularizer(torch.tensor([0.75, 0.25]), 2.0)) == pytest.approx((0.75 + 0.75) / 2)
    assert float(rounding_regularizer(torch.tensor([0.25]), 3.0)) == pytest.approx(0.875)


def test_beta_schedule_hand_values():
    # 10 iterations, 20% warm-up: iterations 0, 1 off; 2 -> 20; 9 -> 2; linear in between (step 18/7)
    assert [beta_schedule(i, 10) for i in (0, 1)] == [None, None]
    assert beta_schedule(2, 10) == 20.0 and beta_schedule(9, 10) == 2.0
    assert beta_schedule(5, 10) == pytest.approx(20 - 3 * 18 / 7)


def test_learned_rounding_starts_at_the_fp_weight_and_rtn_codes():
    w = torch.randn(16, 64) * 0.1
    scheme = QuantScheme(3, 32)
    scale, zero = compute_qparams(w, scheme, torch.float16)
    r = LearnedRounding(w, scale, zero, scheme)
    soft = r.soft_weight()
    inside = (torch.floor(w.reshape(16, 2, 32) / scale.float()[..., None]) + zero.float()[..., None]).reshape(16, 64)
    inside = (inside >= 0) & (inside + 1 <= scheme.qmax)  # no clamp can act on these
    torch.testing.assert_close(soft[inside], w[inside], rtol=0, atol=1e-4 * float(scale.float().max()))
    rtn = quantize(w, scale, zero, scheme)
    assert (r.hard_codes() == rtn).float().mean() > 0.999  # differs only at exact .5 ties


def test_soft_weight_gradient_matches_autograd_of_the_formula():
    """The memory-lean custom backward equals autograd through the plain formula (incl. clamps)."""
    w = torch.randn(8, 64) * 0.1
    w[0, :4] = torch.tensor([0.5, -0.5, 0.49, -0.49])  # extremes: codes at the clamp edges
    scheme = QuantScheme(3, 32)
    scale, zero = compute_qparams(w, scheme, torch.float16)
    r = LearnedRounding(w, scale, zero, scheme)
    with torch.no_grad():
        r.v.add_(torch.randn(r.v.shape) * 2)  # spread h over (0, 1) and both flat ends
    g = torch.randn(8, 64)
    (r.soft_weight() * g).sum().backward()
    v = r.v.detach().clone().requires_grad_(True)
    base = torch.floor(w.reshape(8, 2, 32) / scale.float()[..., None])
    q = (base + rectified_sigmoid(v) + zero.float()[..., None]).clamp(0, 7)
    ref = ((q - zero.float()[..., None]) * scale.float()[..., None]).reshape(8, 64)
    torch.testing.assert_close(r.soft_weight().detach(), ref.detach(), rtol=0, atol=1e-7)
    (ref * g).sum().backward()
    torch.testing.assert_close(r.v.grad, v.grad, rtol=1e-5, atol=1e-7)
    assert (v.grad == 0).any() and (v.grad != 0).any()


def test_ste_activation_quant_forward_and_gradient():
    x = torch.randn(5, 16, requires_grad=True)
    y = ste_quantize_activations(x, 4)
    assert torch.equal(y.detach(), fake_quantize_activations(x.detach(), 4))
    (y * torch.arange(16.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(16.0).expand(5, 16))


def test_error_terms_hand_example():
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    w = torch.tensor([1.0, 0.5, 0.0])
    assert float(error_terms(delta, w, "mse")) == 1 * 5 + 0.5 * 25  # third token weighs 0
    assert float(error_terms(delta, None, "mae")) == 11.0
    s = Sample(torch.zeros(4, 2), {}, torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([0, 0, 0, 1]).bool())
    assert token_weights(s, 0.3).tolist() == pytest.approx([0.3, 0.3, 0.0, 1.0])
    assert token_weights(s, None) is None
    assert error_count(s, 2, 0.3) == (2 + 1) * 2 and error_count(s, 2, None) == 4 * 2


def test_vision_ratio_for():
    sens = {4: {"r_attn": 0.2, "r_mlp": 0.4}, 5: {"r_attn": 0.6, "r_mlp": 0.8}}
    assert vision_ratio_for(sens, [4, 5]) == 0.8
    assert vision_ratio_for(sens, [4, 5], "mean") == pytest.approx(0.5)
    assert vision_ratio_for({"5": {"r_attn": 1.0, "r_mlp": 2.0}}, [5]) == 2.0  # JSON keys


# ------------------------------------------------------------------------------- reconstruction


@pytest.fixture(scope="module")
def toy():
    return make_toy_block()


@pytest.fixture(scope="module")
def qvlm_result(toy):
    layers, samples = toy
    return search_qvlm(layers, [0, 1], BlockCalib(samples), settings())


def test_reconstruction_lowers_block_error_below_rtn(toy, qvlm_result):
    layers, samples = toy
    m = qvlm_result.metrics
    rtn_mse = block_mse(layers, [0, 1], samples, search_rtn(layers, [0, 1], None, settings()).quantized)
    got_mse = block_mse(layers, [0, 1], samples, qvlm_result.quantized)
    assert not m["fell_back"]
    assert m["mse_start"] == pytest.approx(rtn_mse, rel=1e-4)  # the metric is the RTN block error
    assert m["mse_after"] == pytest.approx(got_mse, rel=1e-4)  # ... and the returned codes' error
    assert got_mse < 0.9 * rtn_mse, (got_mse, rtn_mse)
    assert m["iters"] == 120 and len(m["loss_curve"]) >= 10 and m["seconds"] > 0
    assert set(qvlm_result.quantized) == {f"{i}.{n}" for i in (0, 1) for g in LLAMA_LIKE_GROUPS for n in g.linears}


def test_roundings_stay_within_floor_and_ceil_and_pack_like_rtn(toy, qvlm_result):
    layers, _ = toy
    rtn = search_rtn(layers, [0, 1], None, settings()).quantized
    flipped = 0
    for name, qw in qvlm_result.quantized.items():
        ref = rtn[name]
        assert torch.equal(qw.scale, ref.scale) and torch.equal(qw.zero, ref.zero)
        assert qw.qweight.dtype == ref.qweight.dtype and qw.scheme == ref.scheme
        assert qw.qweight.min() >= 0 and qw.qweight.max() <= 7
        i, rel = name.split(".", 1)
        w = layers[int(i)].get_submodule(rel).weight.detach()
        base = torch.floor(w.reshape(w.shape[0], -1, 32) / qw.scale.float()[..., None]) + qw.zero.float()[..., None]
        lo, hi = base.clamp(0, 7), (base + 1).clamp(0, 7)
        q = qw.qweight.reshape(lo.shape).float()
        assert ((q == lo) | (q == hi)).all(), name
        flipped += int((qw.qweight != ref.qweight).sum())
    assert flipped > 0  # it did learn something other than RTN


def test_int8_activations_inside_the_block(toy):
    """abits 8: the block error is measured with per-token int8 Linear inputs, and still improves."""
    layers, samples = toy
    res = search_qvlm(layers, [0, 1], BlockCalib(samples), settings(abits=8, iters=60))
    m = res.metrics
    rtn = search_rtn(layers, [0, 1], None, settings()).quantized
    assert m["act_quant"] == "per-token int8"
    assert m["mse_start"] == pytest.approx(block_mse(layers, [0, 1], samples, rtn, abits=8), rel=1e-4)
    assert m["mse_after"] == pytest.approx(block_mse(layers, [0, 1], samples, res.quantized, abits=8), rel=1e-4)
    assert m["mse_after"] < m["mse_start"]


def test_search_does_not_modify_the_layers_and_registry(toy):
    layers, samples = toy
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    flags = [p.requires_grad for layer in layers for p in layer.parameters()]
    search_qvlm(layers[:1], [0], BlockCalib(samples[:2]), settings(iters=3))
    for layer, sd in zip(layers, before):
        assert all(torch.equal(v, sd[k]) for k, v in layer.state_dict().items())
    assert flags == [p.requires_grad for layer in layers for p in layer.parameters()]
    assert get_search("qvlm") is search_qvlm


# ------------------------------------------------------------------------------- on top of a scale search


def fake_start_layer(layer, idx, samples, settings_, sensitivity):
    """Stands in for MBQ's per-layer step: folds fixed per-channel scales (x4 on the outlier channels)
    out of the two norms into the Linears they feed, RTN on the folded weights."""
    quantized, replaced, fp = {}, {}, {}
    s = torch.ones(layer.input_layernorm.weight.shape[0])
    s[list(OUTLIERS)] = 4.0
    for g in settings_.groups:
        prev = layer.get_submodule(g.prev_op)
        scaled = not isinstance(prev, torch.nn.Linear)
        if scaled:
            replaced[f"{g.prev_op}.weight"] = prev.weight.detach() / s
        for n in g.linears:
            fp[n] = layer.get_submodule(n).weight.detach() * (s[None, :] if scaled else 1.0)
            quantized[n] = quantize_weight(fp[n], settings_.scheme, settings_.scale_dtype)
    return quantized, replaced, {"fake": True}, fp


def test_code_agreement():
    w = torch.randn(8, 64)
    qw = quantize_weight(w, QuantScheme(3, 32), torch.float16)
    assert code_agreement({"a": w}, {"a": qw}) == 1.0
    qw.qweight[0, :16] = (qw.qweight[0, :16] + 1) % 8
    assert code_agreement({"a": w}, {"a": qw}) == 1 - 16 / 512


def test_on_top_of_a_scale_search_with_modality_weighting(toy):
    layers, samples = toy
    sens = {0: {"r_attn": 0.5, "r_mlp": 0.25}, 1: {"r_attn": 0.5, "r_mlp": 0.25}}
    res = search_on_top(fake_start_layer, "qvlm+fake", layers, [0, 1], BlockCalib(samples, sens), settings(iters=80))
    m = res.metrics
    assert m["vision_ratio"] == 0.25 and m["weighting"] == "mbq" and m["start_code_agreement"] == 1.0
    assert set(res.replaced) == {f"{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")}
    start = {f"{j}.{k}": v for j in (0, 1) for k, v in fake_start_layer(layers[j], j, None, settings(), None)[0].items()}
    assert m["error_after"] < m["error_start"] and not m["fell_back"]
    # errors measured independently, with the folded norms loaded into copies of the layers
    assert block_mse(layers, [0, 1], samples, res.quantized, res.replaced) == pytest.approx(m["mse_after"], rel=1e-4)
    assert block_mse(layers, [0, 1], samples, start, res.replaced) == pytest.approx(m["mse_start"], rel=1e-4)
    # the weighted error: answer tokens 1, vision tokens r, the rest 0, over (N_ans + N_vis) * C
    num = den = 0.0
    q = copy.deepcopy(layers)
    for name, t in res.replaced.items():
        i, rel = name.split(".", 1)
        q[int(i)].get_parameter(rel).data.copy_(t)
    for name, qw in res.quantized.items():
        i, rel = name.split(".", 1)
        q[int(i)].get_submodule(rel).weight.data.copy_(qw.dequantize(torch.float32))
    with torch.no_grad():
        for smp in samples:
            d = run_block(q, smp.hidden, smp.layer_kwargs) - run_block(layers, smp.hidden, smp.layer_kwargs)
            per_tok = d.double().square().sum(-1)
            num += float(per_tok[smp.answer_mask].sum() + 0.25 * per_tok[smp.vision_mask].sum())
            den += float(smp.answer_mask.sum() + smp.vision_mask.sum()) * d.shape[-1]
    assert m["error_after"] == pytest.approx(num / den, rel=1e-4)
    for name, qw in res.quantized.items():  # on the start grid, within floor/ceil of the folded weight
        assert torch.equal(qw.scale, start[name].scale)
        assert (qw.qweight.int() - start[name].qweight.int()).abs().max() <= 1
    assert m["error_rtn"] > 0


def test_qvlm_mbq_starts_from_mbq_exactly(toy):
    """The per-layer MBQ step inside qvlm+mbq reproduces search_mbq's result (same codes, same
    folded norms), and reconstruction on top of it lowers the MBQ-weighted block error."""
    from pipeline.quant.mbq import search_mbq
    from pipeline.quant.qvlm import search_qvlm_mbq

    layers, samples = toy
    sens = {0: {"r_attn": 0.7, "r_mlp": 0.4}, 1: {"r_attn": 0.6, "r_mlp": 0.3}}
    st = settings(iters=60, grid=4, clip=False)
    mbq = search_mbq(layers, [0, 1], BlockCalib(samples, sens), st)
    res = search_qvlm_mbq(layers, [0, 1], BlockCalib(samples, sens), st)
    m = res.metrics
    assert set(res.replaced) == set(mbq.replaced)
    assert all(torch.equal(res.replaced[k], mbq.replaced[k]) for k in mbq.replaced)
    assert m["start_code_agreement"] == 1.0 and m["vision_ratio"] == 0.3
    assert block_mse(layers, [0, 1], samples, mbq.quantized, mbq.replaced) == pytest.approx(m["mse_start"], rel=1e-4)
    assert m["error_after"] < m["error_start"]
    for name, qw in res.quantized.items():
        assert torch.equal(qw.scale, mbq.quantized[name].scale) and torch.equal(qw.zero, mbq.quantized[name].zero)
    assert get_search("qvlm+mbq") is search_qvlm_mbq


def test_w4a8_symmetric_per_channel_grid(toy):
    """The W4A8 weight grid (per output channel, symmetric, no zero point) works the same way."""
    layers, samples = toy
    st = SearchSettings(QuantScheme(4, None, symmetric=True), LLAMA_LIKE_GROUPS, torch.float16, abits=8,
                        options=dict(iters=40, lr=1e-2, batch_size=4, round_lambda=1e4))
    res = search_qvlm(layers[:1], [0], BlockCalib(samples), st)
    rtn = search_rtn(layers[:1], [0], None, st).quantized
    for name, qw in res.quantized.items():
        assert qw.zero is None and torch.equal(qw.scale, rtn[name].scale)
        w = layers[0].get_submodule(name.split(".", 1)[1]).weight.detach()
        base = torch.floor(w / qw.scale.float())
        q = qw.qweight.float()
        assert ((q == base.clamp(-8, 7)) | (q == (base + 1).clamp(-8, 7))).all()
    assert res.metrics["mse_after"] < res.metrics["mse_start"]
