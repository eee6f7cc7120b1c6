"""AWQ: folding is exact, the grid loss matches a float64 re-derivation, AWQ beats RTN, clip helps."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models import ADAPTERS
from pipeline.models.base import LLAMA_LIKE_GROUPS
from pipeline.models.layer_io import capture_layer_io
from pipeline.models.tiny import TINY_FAMILIES, build_tiny_model
from pipeline.quant.apply import apply_fake_quant
from pipeline.quant.awq import awq_scales, search_awq
from pipeline.quant.groups import foldable, folded_tensors, load_tensors
from pipeline.quant.quantizer import QuantScheme, fake_quantize
from pipeline.quant.rtn import search_rtn
from pipeline.quant.types import BlockCalib, layer_forward
from scale_layers import decoder_layer, rotary, samples, settings


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _random_scales(layer, gen) -> dict[str, torch.Tensor]:
    out = {}
    for g in LLAMA_LIKE_GROUPS:
        if foldable(layer, g) is None:
            c = layer.get_submodule(g.linears[0]).in_features
            out[g.name] = torch.exp(1.5 * torch.randn(c, generator=gen, dtype=torch.float64))
    return out


@torch.no_grad()
def _check_fold(layer, hidden, kwargs, gen) -> None:
    ref = layer_forward(layer, hidden, kwargs)
    scales = _random_scales(layer, gen)
    folded = load_tensors(copy.deepcopy(layer), folded_tensors(layer, LLAMA_LIKE_GROUPS, scales))
    assert _rel(layer_forward(folded, hidden, kwargs), ref) <= 1e-6
    # negative control: the same scales without touching the Linears must change the output a lot
    prev_only = {k: v for k, v in folded_tensors(layer, LLAMA_LIKE_GROUPS, scales).items()
                 if "layernorm" in k}
    broken = load_tensors(copy.deepcopy(layer), prev_only)
    assert _rel(layer_forward(broken, hidden, kwargs), ref) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fold_leaves_layer_output_unchanged(arch, kv_heads):
    gen = torch.Generator().manual_seed(100 + kv_heads)
    layer, cfg = decoder_layer(arch, seed=int(torch.randint(0, 1000, ())), dtype=torch.float64, kv_heads=kv_heads)
    assert (foldable(layer, LLAMA_LIKE_GROUPS[1]) is None) == (kv_heads == 4)  # o <- v only without GQA
    t = 40
    hidden = torch.randn(t, cfg.hidden_size, dtype=torch.float64, generator=gen) * 3
    _check_fold(layer, hidden, rotary(cfg, t, torch.float64), gen)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fold_every_family_decoder_layer(family):
    gen = torch.Generator().manual_seed(7)
    model, _ = build_tiny_model(family, seed=int(torch.randint(0, 1000, ())), dtype=torch.float64)
    a = ADAPTERS[family]
    lm = model.get_submodule(a.language_model_path)
    layers = model.get_submodule(a.layers_path)
    with torch.no_grad():
        for name, p in layers[0].named_parameters():  # the tiny init has all-ones norms: randomize
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        embeds = torch.randn(1, 24, lm.config.hidden_size, dtype=torch.float64, generator=gen)
        ins, _, kw = capture_layer_io(lm, layers, {"inputs_embeds": embeds})
        _check_fold(layers[0], ins[0][0], kw, gen)


def _capture(layer, smps, path) -> torch.Tensor:
    """A Linear's inputs over all samples, by a plain forward hook (independent of the library)."""
    got = []
    h = layer.get_submodule(path).register_forward_hook(lambda m, a, o: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for s in smps:
            layer_forward(layer, s.hidden, s.layer_kwargs)
    h.remove()
    return torch.cat(got)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_grid_losses_match_float64_reference(kv_heads):
    layer, cfg = decoder_layer("qwen2", seed=3, dtype=torch.float64, outliers=3, kv_heads=kv_heads)
    smps = samples(cfg, n=2, tokens=24, seed=int(torch.randint(0, 1000, ())), dtype=torch.float64)
    st = settings(bits=3, group=32, clip=False, grid=6, chunk_tokens=13)  # chunks cross sample boundaries
    res = search_awq([layer], [5], BlockCalib(smps), st)
    m = res.metrics["layers"]["5"]
    scheme = st.scheme
    for g in LLAMA_LIKE_GROUPS:
        x = _capture(layer, smps, g.linears[0])
        ws = [layer.get_submodule(n).weight.detach() for n in g.linears]
        y = torch.cat([x @ w.T for w in ws], 1)
        if g.name == "o" and kv_heads == 2:
            assert "grouped-query" in m["o"]["skipped"] and "grid" not in m["o"]
            assert torch.equal(res.quantized["5.self_attn.o_proj"].dequantize(torch.float64),
                               fake_quantize(ws[0], scheme, torch.float32))
            continue
        xbar = x.abs().mean(0)
        ref = []
        for i in range(6):
            s = xbar ** (i / 6)
            s = s / (s.max() * s.min()).sqrt()
            yq = torch.cat([x @ (fake_quantize(w * s, scheme, torch.float32) / s).T for w in ws], 1)
            ref.append(float((yq - y).square().mean()))
        assert m[g.name]["grid"] == pytest.approx(ref, rel=1e-9)
        assert m[g.name]["alpha"] == min(range(6), key=ref.__getitem__) / 6
        assert m[g.name]["loss_rtn"] == pytest.approx(ref[0], rel=1e-9)
        # the returned fold is the chosen alpha's: norm weights / s
        if g.prev_op.endswith("layernorm"):
            s = awq_scales(xbar, m[g.name]["alpha"])
            norm = layer.get_parameter(f"{g.prev_op}.weight").detach()
            assert torch.allclose(res.replaced[f"5.{g.prev_op}.weight"], norm / s, rtol=1e-12, atol=0)
    # Qwen2's v_proj bias folds with the o group, only without GQA
    assert ("5.self_attn.v_proj.bias" in res.replaced) == (kv_heads == 4)
    assert not any(k.endswith("proj.weight") for k in res.replaced)


def _layer_error(layer, res, smps, layer_idx=0) -> float:
    """Output MSE of the layer with the result applied (folded norms + dequantized weights)."""
    q = copy.deepcopy(layer)
    apply_fake_quant(q, {k.split(".", 1)[1]: v for k, v in res.quantized.items()},
                     {k.split(".", 1)[1]: v for k, v in res.replaced.items()})
    with torch.no_grad():
        return sum(float((layer_forward(q, s.hidden, s.layer_kwargs)
                          - layer_forward(layer, s.hidden, s.layer_kwargs)).square().mean()) for s in smps)


def test_awq_beats_rtn_and_clip_lowers_it_further():
    seed = int(torch.randint(0, 1000, ()))
    layer, cfg = decoder_layer("llama", seed=seed, outliers=4)
    calib = samples(cfg, n=3, tokens=64, seed=seed + 1)
    held_out = samples(cfg, n=2, tokens=64, seed=seed + 2)
    st = settings(bits=3, group=32, grid=10, chunk_tokens=50)  # several loss chunks
    rtn = search_rtn([layer], [0], None, st)
    noclip = search_awq([layer], [0], BlockCalib(calib), settings(bits=3, group=32, clip=False, grid=10))
    clip = search_awq([layer], [0], BlockCalib(calib), st)
    e_rtn, e_awq, e_clip = (_layer_error(layer, r, calib) for r in (rtn, noclip, clip))
    assert e_awq < 0.8 * e_rtn
    # clip minimizes each Linear's output error on a token subsample (what it promises), which
    # also keeps the whole layer's error at AWQ's level or below on every draw
    assert e_clip < 1.05 * e_awq
    # held out (2 samples, noisy): AWQ / RTN error is 0.42 +- 0.13 over 400 seeds, worst 0.91; the
    # 0.85 bound this had failed ~1% of draws (seeds 83, 146), so a draw must only beat RTN
    assert _layer_error(layer, noclip, held_out) < _layer_error(layer, rtn, held_out)
    groups = [clip.metrics["layers"]["0"][g.name] for g in LLAMA_LIKE_GROUPS]
    for m in groups:
        assert m["loss_scaled"] <= m["loss_rtn"]
        assert m["loss_clip"] <= m["loss_scaled"] * (1 + 1e-9)
        assert m["clip"].get("self_attn.q_proj", {}).get("skipped", "q/k") == "q/k"  # q/k not clipped by default
    assert any(m["loss_clip"] < 0.98 * m["loss_scaled"] for m in groups)
    assert sum(m["loss_clip"] for m in groups) < sum(m["loss_scaled"] for m in groups)
    assert set(clip.metrics["layers"]["0"]["time_s"]) == {"capture", "scales", "clip", "finalize"}


def test_captured_chunks_and_subsample_keep_tokens_aligned():
    from pipeline.quant.groups import capture_group_inputs

    layer, cfg = decoder_layer("llama", seed=2)
    smps = samples(cfg, n=3, tokens=10, seed=int(torch.randint(0, 1000, ())))
    gi = capture_group_inputs(layer, smps, "mlp.down_proj", "cpu", chunk_tokens=8)
    x = _capture(layer, smps, "mlp.down_proj")
    vis = torch.cat([s.vision_mask for s in smps])
    ans = torch.cat([s.answer_mask for s in smps])
    assert [c.x.shape[0] for c in gi.chunks] == [8, 8, 8, 8, 8, 2]  # 10 + 14 + 18 tokens
    assert torch.equal(torch.cat([c.x for c in gi.chunks]), x)
    assert torch.allclose(gi.absmean, x.abs().mean(0)) and torch.equal(gi.absmax, x.abs().amax(0))
    sub = gi.subsample(9)
    idx = torch.linspace(0, x.shape[0] - 1, 9).round().long()
    assert torch.equal(sub.x, x[idx]) and torch.equal(sub.vision, vis[idx]) and torch.equal(sub.answer, ans[idx])


def test_one_pass_capture_equals_per_group_capture_and_the_same_search():
    """All groups' inputs from one layer pass are those of one pass per group (each checked against
    a separately hooked forward), and the search result is the same either way, to the bit."""
    from pipeline.quant.groups import capture_groups_inputs

    layer, cfg = decoder_layer("llama", seed=5, outliers=2)
    smps = samples(cfg, n=3, tokens=12, seed=int(torch.randint(0, 1000, ())))
    paths = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    together = capture_groups_inputs(layer, smps, paths, "cpu", chunk_tokens=16)
    for p in paths:
        x = _capture(layer, smps, p)
        assert torch.equal(torch.cat([c.x for c in together[p].chunks]), x)
        assert torch.equal(together[p].absmax, x.abs().amax(0))
    st = settings(bits=3, group=32, clip=True, grid=4)
    one = search_awq([layer], [0], BlockCalib(smps), st)
    st_sep = settings(bits=3, group=32, clip=True, grid=4, capture_together=False)
    sep = search_awq([layer], [0], BlockCalib(smps), st_sep)
    for k, qw in one.quantized.items():
        assert torch.equal(qw.qweight, sep.quantized[k].qweight) and torch.equal(qw.scale, sep.quantized[k].scale)
    for k, t in one.replaced.items():
        assert torch.equal(t, sep.replaced[k])


def test_multi_layer_block_uses_fp_inputs_of_each_layer():
    l0, cfg = decoder_layer("llama", seed=11, outliers=2)
    l1, _ = decoder_layer("llama", seed=12, outliers=2)
    smps = samples(cfg, n=2, tokens=24, seed=int(torch.randint(0, 1000, ())))
    st = settings(bits=3, group=32, clip=False, grid=3)
    both = search_awq([l0, l1], [3, 4], BlockCalib(smps), st)
    with torch.no_grad():
        shifted = [type(s)(layer_forward(l0, s.hidden, s.layer_kwargs), s.layer_kwargs, s.vision_mask, s.answer_mask)
                   for s in smps]
    alone = search_awq([l1], [4], BlockCalib(shifted), st)
    for g in LLAMA_LIKE_GROUPS:
        assert both.metrics["layers"]["4"][g.name] == alone.metrics["layers"]["4"][g.name]
    assert torch.equal(both.quantized["4.mlp.down_proj"].qweight, alone.quantized["4.mlp.down_proj"].qweight)
    assert set(both.quantized) == {f"{i}.{n}" for i in (3, 4) for g in LLAMA_LIKE_GROUPS for n in g.linears}


def test_w4a8_loss_quantizes_activations():
    """RTN loss of a W4A8 search equals mean((A8(X) @ Q4(W)^T - X @ W^T)^2), computed directly."""
    layer, cfg = decoder_layer("llama", seed=5, dtype=torch.float64, outliers=3)
    smps = samples(cfg, n=2, tokens=40, seed=int(torch.randint(0, 1000, ())), dtype=torch.float64)
    st = settings(bits=4, group=None, sym=True, abits=8, clip=False, grid=4)
    m = search_awq([layer], [0], BlockCalib(smps), st).metrics["layers"]["0"]
    from pipeline.quant.quantizer import fake_quantize_activations

    for g in LLAMA_LIKE_GROUPS:
        x = _capture(layer, smps, g.linears[0])
        ws = [layer.get_submodule(n).weight.detach() for n in g.linears]
        xa = fake_quantize_activations(x, 8)
        d = torch.cat([xa @ fake_quantize(w, QuantScheme(4, None, True), torch.float32).T - x @ w.T for w in ws], 1)
        assert m[g.name]["loss_rtn"] == pytest.approx(float(d.square().mean()), rel=1e-9)
        assert m[g.name]["loss_rtn"] > 0


@pytest.mark.parametrize("scheme", [QuantScheme(3, 32), QuantScheme(4, None, True), QuantScheme(2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_search_fake_quant_is_the_quantizer(scheme, dtype):
    from pipeline.quant.awq import fake_quant

    w = torch.randn(16, 128, dtype=dtype) * torch.rand(16, 1, dtype=dtype)
    w[3, :32] = 0.25  # a constant group
    for sd in (torch.float16, torch.bfloat16):
        assert torch.equal(fake_quant(w, scheme, sd), fake_quantize(w, scheme, sd))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["awq", "mbq", "smoothquant"])
@pytest.mark.parametrize("abits", [16, 8])
def test_cuda_search_matches_cpu(method, abits):
    from pipeline.quant import SEARCHES
    from scale_layers import calib as make_calib

    layer, cfg = decoder_layer("qwen2", seed=int(torch.randint(0, 1000, ())), outliers=3)
    smps = samples(cfg, n=2, tokens=48, seed=int(torch.randint(0, 1000, ())))
    kw = dict(bits=4, group=None, sym=True) if abits == 8 else dict(bits=3, group=32)
    # fp16 scales as in the pipeline (fp32 scales differ in the last bit between CPU and CUDA:
    # compute_qparams's division by qmax is a reciprocal multiply on CUDA)
    st = settings(**kw, abits=abits, grid=10, search_dtype="float32", scale_dtype=torch.float16)
    cpu = SEARCHES[method]([layer], [0], make_calib(smps, 0.4, 0.6), st)
    st.device = "cuda"
    gpu = SEARCHES[method]([copy.deepcopy(layer).cuda()], [0], make_calib(smps, 0.4, 0.6), st)
    mc, mg = cpu.metrics["layers"]["0"], gpu.metrics["layers"]["0"]
    # 1-ulp input differences flip a rare weight scale's fp16 rounding or an int8 activation code
    tol = 2e-3
    for g in ("qkv", "o", "gate_up", "down"):
        assert mg[g]["loss_rtn"] == pytest.approx(mc[g]["loss_rtn"], rel=tol)
        assert mg[g].get("grid", []) == pytest.approx(mc[g].get("grid", []), rel=tol)
        assert mg[g]["loss_scaled"] == pytest.approx(mc[g]["loss_scaled"], rel=tol)
        assert mg[g]["loss_final"] == pytest.approx(mc[g]["loss_final"], rel=10 * tol)
    same = sum(int((cpu.quantized[k].qweight == gpu.quantized[k].qweight).sum()) for k in cpu.quantized)
    assert same / sum(v.qweight.numel() for v in cpu.quantized.values()) > 0.99
    # the default on CUDA: 16-bit activations and matmuls
    st16 = settings(**kw, abits=abits, grid=10, scale_dtype=torch.bfloat16)
    st16.device = "cuda"
    b16 = SEARCHES[method]([copy.deepcopy(layer).to("cuda", torch.bfloat16)], [0], make_calib(smps, 0.4, 0.6), st16)
    for g in LLAMA_LIKE_GROUPS:  # a bf16-rounded layer: close, not equal
        m = b16.metrics["layers"]["0"][g.name]
        assert m["loss_final"] == pytest.approx(mc[g.name]["loss_final"], rel=0.3)
        assert m["loss_final"] <= m["loss_rtn"] or method == "smoothquant"  # SQ has no search


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_gram_form_of_the_squared_loss_is_the_direct_one(dtype, rel):
    """trace(A G A^T) with G = X^T D X gives every grid loss of the direct form and the same choices,
    for AWQ (D = 1) and for MBQ's modality weights with --loss mse; the clipped loss too."""
    from pipeline.quant.mbq import search_mbq
    from scale_layers import calib as mbq_calib

    layer, cfg = decoder_layer("qwen2", seed=7, dtype=dtype, outliers=3)
    smps = samples(cfg, n=3, tokens=20, seed=int(torch.randint(0, 1000, ())), dtype=dtype)
    for run in (lambda **o: search_awq([layer], [0], BlockCalib(smps), settings(bits=3, group=32, grid=8,
                                                                              chunk_tokens=17, **o)),
                lambda **o: search_mbq([layer], [0], mbq_calib(smps, r_attn=0.3, r_mlp=2.0),
                                       settings(bits=3, group=32, grid=8, loss="mse", chunk_tokens=17, **o))):
        direct, gram = run(gram=False), run(gram=True)
        for g in LLAMA_LIKE_GROUPS:
            md, mg = direct.metrics["layers"]["0"][g.name], gram.metrics["layers"]["0"][g.name]
            if "grid" in md:
                assert mg["grid"] == pytest.approx(md["grid"], rel=rel)
                assert mg["alpha"] == md["alpha"]
            assert mg["loss_final"] == pytest.approx(md["loss_final"], rel=rel)
        for k, qw in direct.quantized.items():
            assert torch.equal(qw.qweight, gram.quantized[k].qweight), k


def test_gram_pays_by_hand():
    from pipeline.quant.awq import gram_pays

    # Qwen2-VL-7B at 48,128 tokens: qkv (in 3584, out 4608), gate/up (out 37888), o: yes; down (in 18944): no
    assert gram_pays("mse", 16, 48128, 3584, 4608) and gram_pays("mse", 16, 48128, 3584, 37888)
    assert gram_pays("mse", 16, 48128, 3584, 3584) and not gram_pays("mse", 16, 48128, 18944, 3584)
    assert not gram_pays("mae", 16, 48128, 3584, 37888)  # |.| has no Gram form
    assert not gram_pays("mse", 8, 48128, 3584, 37888)  # activation quantization is nonlinear in X / s
    assert not gram_pays("mse", 16, 100, 3584, 37888)  # few tokens: the Gram matrix costs more than it saves
