"""MBQ: the balanced loss against hand computation, r = 1 reduces to AWQ, the weighted clip search."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.base import LLAMA_LIKE_GROUPS
from pipeline.quant.awq import clip_search, search_awq
from pipeline.quant.mbq import balanced_loss, search_mbq
from pipeline.quant.quantizer import QuantScheme, fake_quantize
from pipeline.quant.types import BlockCalib, layer_forward
from scale_layers import calib, decoder_layer, samples, settings


def test_balanced_loss_hand_example():
    delta = torch.tensor([[1.0, -2.0], [3.0, 0.0], [100.0, -50.0], [0.5, 0.5]])
    ans = torch.tensor([True, False, False, True])
    vis = torch.tensor([False, True, False, False])  # token 2 is neither: weight 0 however large
    # mae: (|1| + |-2| + |.5| + |.5| + 2 * (3 + 0)) / ((2 + 1) * 2) = (4 + 6) / 6
    assert balanced_loss(delta, ans, vis, r=2.0) == pytest.approx(10 / 6)
    # mse: (1 + 4 + .25 + .25 + 2 * 9) / 6
    assert balanced_loss(delta, ans, vis, r=2.0, norm="mse") == pytest.approx(23.5 / 6)


def _group_io(layer, smps, group):
    xs, vis, ans = [], [], []
    h = layer.get_submodule(group.linears[0]).register_forward_hook(lambda m, a, o: xs.append(a[0][0]))
    with torch.no_grad():
        for s in smps:
            layer_forward(layer, s.hidden, s.layer_kwargs)
            vis.append(s.vision_mask)
            ans.append(s.answer_mask)
    h.remove()
    return torch.cat(xs), torch.cat(vis), torch.cat(ans)


@pytest.mark.parametrize("norm", ["mae", "mse"])
def test_search_loss_is_the_formula(norm):
    """MBQ's reported RTN loss of every group equals the formula summed by hand, token by token."""
    layer, cfg = decoder_layer("qwen2", seed=21, dtype=torch.float64, outliers=2)
    smps = samples(cfg, n=2, tokens=20, seed=int(torch.randint(0, 1000, ())), dtype=torch.float64)
    r_attn, r_mlp = 0.37, 2.5
    st = settings(bits=3, group=32, clip=False, grid=2, loss=norm)
    m = search_mbq([layer], [0], calib(smps, r_attn, r_mlp), st).metrics["layers"]["0"]
    assert m["sensitivity"] == {"r_attn": r_attn, "r_mlp": r_mlp}
    for g in LLAMA_LIKE_GROUPS:
        x, vis, ans = _group_io(layer, smps, g)
        r = r_attn if g.kind == "attn" else r_mlp
        ws = [layer.get_submodule(n).weight.detach() for n in g.linears]
        delta = torch.cat([x @ w.T - x @ fake_quantize(w, st.scheme, torch.float32).T for w in ws], 1)
        num, n_tok = 0.0, 0
        for t in range(x.shape[0]):
            e = delta[t].abs().sum() if norm == "mae" else delta[t].square().sum()
            num += float(e) * (1.0 * bool(ans[t]) + r * bool(vis[t]))
            n_tok += int(ans[t]) + int(vis[t])
        assert m[g.name]["loss_rtn"] == pytest.approx(num / (n_tok * delta.shape[1]), rel=1e-9)


def test_r1_mse_picks_awq_alpha_under_the_same_norm():
    """With r = 1, MSE, and every token an answer or vision token, MBQ's loss is AWQ's mean over all
    tokens: same grid losses, same alphas. With template tokens present the two must differ."""
    layer, cfg = decoder_layer("llama", seed=int(torch.randint(0, 1000, ())), outliers=4)
    st = dict(bits=3, group=32, grid=8, clip=False)
    full = samples(cfg, n=2, tokens=32, seed=8, all_weighted=True)
    for s in full:
        assert bool((s.vision_mask | s.answer_mask).all()) and s.vision_mask.any() and s.answer_mask.any()
    awq = search_awq([layer], [0], BlockCalib(full), settings(**st)).metrics["layers"]["0"]
    mbq = search_mbq([layer], [0], calib(full, 1.0, 1.0), settings(**st, loss="mse")).metrics["layers"]["0"]
    for g in ("qkv", "o", "gate_up", "down"):
        assert mbq[g]["grid"] == pytest.approx(awq[g]["grid"], rel=1e-9)
        assert mbq[g]["alpha"] == awq[g]["alpha"]
    assert any(awq[g]["alpha"] > 0 for g in ("qkv", "o", "gate_up", "down"))  # a real search happened

    partial = samples(cfg, n=2, tokens=32, seed=8)  # has tokens that are neither (weight 0 for MBQ)
    awq_p = search_awq([layer], [0], BlockCalib(partial), settings(**st)).metrics["layers"]["0"]
    mbq_p = search_mbq([layer], [0], calib(partial, 1.0, 1.0), settings(**st, loss="mse")).metrics["layers"]["0"]
    assert mbq_p["qkv"]["grid"] != pytest.approx(awq_p["qkv"]["grid"], rel=1e-3)


def test_missing_sensitivity_is_an_error():
    layer, cfg = decoder_layer("llama", seed=1)
    with pytest.raises(ValueError, match="sensitivity"):
        search_mbq([layer], [0], BlockCalib(samples(cfg, n=1, tokens=16)), settings())
    ok = BlockCalib(samples(cfg, n=1, tokens=16), sensitivity={"0": {"r_attn": 1.0, "r_mlp": 1.0}})  # JSON keys
    assert "0.mlp.down_proj" in search_mbq([layer], [0], ok, settings(grid=2, clip=False)).quantized


@pytest.mark.parametrize("norm", ["mae", "mse"])
def test_weighted_clip_search_matches_brute_force(norm):
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    w = torch.randn(5, 64, generator=g, dtype=torch.float64)
    w[:, 3] *= 6  # an outlier weight per row: clipping it can pay
    x = torch.randn(30, 64, generator=g, dtype=torch.float64)
    wt = torch.rand(30, generator=g, dtype=torch.float64) * (torch.rand(30, generator=g) > 0.3)
    scheme = QuantScheme(3, 32)
    ratios = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    got = clip_search(w, x, wt, norm, scheme, torch.float32, 16, ratios, budget=64)  # small budget: row chunks
    want = torch.ones(5, 2, dtype=torch.float64)
    for o in range(5):
        for k in range(2):
            sl = slice(32 * k, 32 * k + 32)
            errs = []
            for r in ratios:
                m = w[o, sl].abs().max() * r
                wq = fake_quantize(w[o, sl].clamp(-m, m)[None], QuantScheme(3, None), torch.float32)[0]
                part = x[:, sl] @ (wq - w[o, sl])
                errs.append(float((wt * (part.abs() if norm == "mae" else part.square())).sum()))
            want[o, k] = ratios[min(range(len(ratios)), key=errs.__getitem__)]
    assert torch.equal(got, want)
    assert (got < 1).any()  # the outliers made clipping worthwhile somewhere


@pytest.mark.parametrize("norm", ["mae", "mse"])  # mse takes the Gram-block form (group size 32 < 300 tokens)
def test_modality_weighted_clip_minimizes_its_own_objective(norm):
    """MBQ's extension: modality weights inside the clip search. Each ratio choice is optimal for its
    own objective (checked in float64 against every candidate ratio), and the weighting changes
    choices where vision and text tokens disagree. The recipe flag reaches the search options."""
    import random

    from pipeline.config import QuantRecipe
    from pipeline.quant.awq import ScaleOptions, clamp_groups, clip_search, fake_quant

    g = torch.Generator().manual_seed(random.randrange(10**6))
    scheme = QuantScheme(3, 32, False)
    w = torch.randn(12, 64, generator=g)
    xs = torch.randn(300, 64, generator=g) * 0.2
    vision = torch.arange(300) < 150
    xs[vision] = torch.randn(150, 64, generator=g) * 4.0  # vision tokens: large, weighted little
    # vision weight small enough that text tokens lead the weighted objective (squares need smaller)
    weights = torch.where(vision, 0.05 if norm == "mae" else 5e-4, 1.0)
    ratios = [1.0 - i / 20 for i in range(11)]

    def errors(weights_or_none):  # [n_ratios, out, groups] in float64, straight from the definition
        out = []
        for r in ratios:
            cand = clamp_groups(w, torch.full((12, 2), r), scheme)
            dq = (fake_quant(cand, scheme, torch.float32) - w).double().reshape(12, 2, 32)
            part = torch.einsum("tgk,ogk->tog", xs.double().reshape(300, 2, 32), dq)
            part = part.abs() if norm == "mae" else part.square()
            wt = torch.ones(300, dtype=torch.float64) if weights_or_none is None else weights_or_none.double()
            out.append((part * wt[:, None, None]).sum(0))
        return torch.stack(out)

    for wts in (weights, None):
        chosen = clip_search(w, xs, wts, norm, scheme, torch.float32, 16, ratios)
        e = errors(wts)
        idx = (chosen.double()[None] - torch.tensor(ratios, dtype=torch.float64)[:, None, None]).abs().argmin(0)
        got = e.gather(0, idx[None]).squeeze(0)
        assert torch.all(got <= e.min(0).values * (1 + 1e-5) + 1e-9)
    assert not torch.equal(clip_search(w, xs, weights, norm, scheme, torch.float32, 16, ratios),
                           clip_search(w, xs, None, norm, scheme, torch.float32, 16, ratios))
    assert ScaleOptions.from_options(vars(QuantRecipe(mbq_clip_weighting=False))).mbq_clip_weighting is False
    assert ScaleOptions.from_options(vars(QuantRecipe())).mbq_clip_weighting is True
