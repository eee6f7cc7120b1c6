"""The decode glue kernels and the decode bench's step, against transformers' own Qwen2 on CPU."""

import pytest
import torch

from kernels.decode_ops import add_rmsnorm, decode_attention, rope_attention, rope_kv, silu_mul

from kt_helpers import attention_case


def test_add_rmsnorm_matches_transformers(gen, device):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(300, eps=1e-6)
    norm.weight.data = (1 + 0.1 * torch.randn(300, generator=gen))
    norm = norm.half()
    x = torch.randn(3, 300, generator=gen).half()
    res = torch.randn(3, 300, generator=gen).half()
    want_res = res + x
    want = norm(want_res)
    r = res.clone().to(device)
    y = add_rmsnorm(x.to(device), r, norm.weight.data.to(device), 1e-6)
    assert torch.equal(r.cpu(), want_res)
    assert torch.allclose(y.cpu().float(), want.float(), atol=2e-3, rtol=2e-3)


def test_rope_kv_and_attention_match_torch(gen, device):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    b, hq, hkv, d, length, pos = 2, 6, 2, 16, 40, 13
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=gen).half()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    kc = torch.randn(b, hkv, length, d, generator=gen).half()
    vc = torch.randn(b, hkv, length, d, generator=gen).half()
    kc_d, vc_d = kc.clone().to(device), vc.clone().to(device)
    p = torch.tensor([pos], dtype=torch.int32, device=device)
    q = rope_kv(qkv.to(device), inv_freq.to(device), p, kc_d, vc_d, hq, hkv)
    # reference: transformers' rotary on float32 copies
    freqs = pos * inv_freq
    emb = torch.cat([freqs, freqs])
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    qh = qkv[:, : hq * d].float().reshape(b, hq, 1, d)
    kh = qkv[:, hq * d:(hq + hkv) * d].float().reshape(b, hkv, 1, d)
    qr, kr = apply_rotary_pos_emb(qh, kh, cos, sin)
    assert torch.allclose(q.cpu().float(), qr[:, :, 0], atol=2e-3, rtol=1e-3)
    kc[:, :, pos] = kr[:, :, 0].half()
    vc[:, :, pos] = qkv[:, (hq + hkv) * d:].reshape(b, hkv, d)
    assert torch.allclose(kc_d.cpu().float(), kc.float(), atol=2e-3)
    assert torch.equal(vc_d.cpu(), vc)
    out = decode_attention(q, kc_d, vc_d, p)
    kk = kc[:, :, : pos + 1].float().repeat_interleave(hq // hkv, dim=1)
    vv = vc[:, :, : pos + 1].float().repeat_interleave(hq // hkv, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(q.cpu().float()[:, :, None], kk, vv)[:, :, 0]
    assert torch.allclose(out.cpu().float(), want.reshape(b, hq * d), atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("pos,block,splits,split_from", [
    (0, 64, 8, 0), (1, 64, 8, 0), (64, 64, 8, 0), (77, 64, 8, 0), (95, 16, 8, 0), (90, 16, 2, 0), (40, 16, 1, 0),
    (95, 16, 8, 32), (20, 16, 8, 32), (95, 32, 8, 512)])
def test_rope_attention_equals_rope_kv_then_attention(pos, block, splits, split_from, gen, device):
    """The fused launch (a GQA group per program, cache blocks spread over splits) computes what the
    two separate ones (checked above against transformers and SDPA) compute: same output, same
    caches -- at pos 0 (no cache yet), on a block edge, over 6 one-block splits merged by the last,
    over 2 splits of 3 blocks each, and in one split looping over 3 blocks; with ``split_from``,
    over 3 splits of 2 blocks (32 positions at least), in one of 2 blocks, and in one split below
    the decode step's 512 positions."""
    hq, hkv = 6, 2
    qkv, inv_freq, p, kc2, vc2, want, kc, vc = attention_case(2, hq, hkv, 32, 96, pos, gen, device)
    out = torch.full_like(want, float("nan"))
    got = rope_attention(qkv, inv_freq, p, kc2, vc2, hq, hkv, out=out, block=block, splits=splits,
                         split_from=split_from)
    assert torch.equal(kc2.cpu(), kc.cpu()) and torch.equal(vc2.cpu(), vc.cpu())
    assert torch.isfinite(got).all()
    assert torch.allclose(got.cpu().float(), want.cpu().float(), atol=3e-3, rtol=1e-2), \
        float((got.cpu().float() - want.cpu().float()).abs().max())
    if pos >= block:  # the per-group counters and the workspace are left at zero for the next call
        from kernels.dispatch import _WS

        ws, cnt = _WS[("attention", torch.device(device).type, torch.device(device).index)]
        assert int(cnt.abs().sum()) == 0 and float(ws.abs().sum()) == 0.0
        got2 = rope_attention(qkv, inv_freq, p, kc2, vc2, hq, hkv, block=block, splits=splits, split_from=split_from)
        assert torch.equal(got2.cpu(), got.cpu())
    with pytest.raises(ValueError, match="powers of 2"):
        rope_attention(qkv, inv_freq, p, kc2, vc2, hq, hkv, block=8)


def test_rope_attention_halves_a_block_the_gpu_cannot_hold(gen, device, monkeypatch):
    """A launch that runs out of shared memory (head dim 256 with 128-position blocks needs 266 KB on
    sm_90, the H100 holds 227) is retried with half the block until one fits, and the block that fit
    is remembered: the output is the reference's, at the block the fake limit allows."""
    import kernels.decode_ops as ops
    from triton.runtime.errors import OutOfResources

    real, tried = ops._rope_attn_kernel, []

    class Limited:  # the kernel, refusing blocks over 32 as a launch over the shared memory would
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append(kw["BL"])
                if kw["BL"] > 32:
                    raise OutOfResources(8 * kw["BL"] * kw["D"] + 4096, 8 * 32 * kw["D"] + 4096, "shared memory")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ops, "_rope_attn_kernel", Limited())
    monkeypatch.setattr(ops, "_ATTN_BLOCK", {})
    hq, hkv = 4, 2
    qkv, inv_freq, p, kc2, vc2, want, kc, vc = attention_case(1, hq, hkv, 32, 96, 70, gen, device)
    got = ops.rope_attention(qkv, inv_freq, p, kc2, vc2, hq, hkv, block=128, split_from=0)
    assert tried == [128, 64, 32]
    assert torch.allclose(got.cpu().float(), want.cpu().float(), atol=3e-3, rtol=1e-2)
    assert torch.equal(kc2.cpu(), kc.cpu()) and torch.equal(vc2.cpu(), vc.cpu())
    ops.rope_attention(qkv, inv_freq, p, kc2, vc2, hq, hkv, block=128, split_from=0)
    assert tried == [128, 64, 32, 32]  # remembered


def test_silu_mul(gen, device):
    gu = torch.randn(2, 2 * 1100, generator=gen).half()
    want = torch.nn.functional.silu(gu[:, :1100].float()) * gu[:, 1100:].float()
    assert torch.allclose(silu_mul(gu.to(device)).cpu().float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("variant", ["fp16", "w4", "w4+head", "w3+head4"])
def test_decode_step_matches_transformers_forward(variant, gen, device):
    """Our graph-capturable step, fed one token at a time, gives the logits of transformers' own
    forward over the whole sequence (same weights; W4: the fake-quant weights, +head: the lm_head's too,
    +head4: the lm_head's at 4 bits under 3-bit layers)."""
    from transformers import Qwen2ForCausalLM

    from pipeline.evaluate.bench_decode import DecodeModel, config_for, parse_variant
    from pipeline.quant.quantizer import QuantScheme, fake_quantize

    cfg = config_for(tiny=True, layers=2)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.vocab_size = 128, 256, 4, 300
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(1.0 if p.shape[0] == 128 else 0.0, 0.05)
    model = DecodeModel(cfg, variant, 1, 16, device, group=64, hf_model=hf)
    if variant != "fp16":
        layer_bits, _, head_bits = parse_variant(variant)
        with torch.no_grad():
            for name, mod in hf.named_modules():
                bits = layer_bits if name.endswith("_proj") and ".layers." in name else head_bits if name == "lm_head" else None
                if bits:
                    mod.weight.copy_(fake_quantize(mod.weight.half().float(), QuantScheme(bits, 64, False),
                                                   torch.float16))
    hf = hf.half() if device == "cuda" else hf.float()
    toks = torch.randint(0, 300, (1, 5), generator=gen)
    with torch.no_grad():
        want = hf(toks.to(device)).logits[0].float().cpu()
        got = []
        for t in range(5):
            model.tokens.fill_(int(toks[0, t]))
            model.step()
            got.append(model.logits[0].float().cpu())
    got = torch.stack(got)
    err = (got - want).norm() / want.norm()
    assert err < 1e-2, float(err)
    assert int(model.pos) == 5


@pytest.mark.parametrize("bits,m", [(4, 1), (3, 2), (4, 3)])
def test_glu_gemv_equals_gemv_then_silu_mul(bits, m, gen, device):
    """The fused gate/up projection (rows interleaved in blocks of 32, silu-mul in the GEMV's
    epilogue, split-K or not, one iteration over two groups) gives what the plain projection followed
    by silu_mul gives, and the torch fallback of QuantLinear(glu=32) agrees with both."""
    from kernels import QuantLinear
    from kernels.decode_ops import interleave_gate_up
    from kernels.dispatch import gemv
    from kernels.tuning import GemvConfig
    from kt_helpers import random_qweight, random_x

    inter, k = 96, 256
    qg = random_qweight(inter, k, bits, 128, False, torch.float16, gen)
    qu = random_qweight(inter, k, bits, 128, False, torch.float16, gen)
    qw = type(qg)(interleave_gate_up(qg.qweight, qu.qweight, 32), interleave_gate_up(qg.scale, qu.scale, 32),
                  interleave_gate_up(qg.zero, qu.zero, 32), qg.scheme)
    lin = QuantLinear.from_quantized(qw, glu=32).to(device)
    plain = QuantLinear.from_quantized(qw).to(device)
    x = random_x(m, k, torch.float16, gen, device)
    wide = dict(R=32 if bits == 4 else 8, x_ahead=False)  # an iteration over two groups, x where used
    for split, sk, kw in ((1, False, {}), (3, False, {}), (None, True, {}), (1, False, wide)):
        cfg = GemvConfig(**{"BN": 64, "R": 4, "h2": True, "split": split, "stream_k": sk, "waves": 2.5, **kw})
        want = silu_mul(gemv(x, plain.packed, cfg=cfg), interleave=32)
        out = torch.full((m, inter), float("nan"), dtype=torch.float16, device=device)
        got = gemv(x, lin.packed, out=out, cfg=cfg, glu=32)
        assert torch.isfinite(got).all()
        assert torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3), float((got - want).abs().max())
    fp32 = GemvConfig(BN=64, R=4, h2=False)  # the portable GEMV: silu-mul as a second launch
    assert torch.allclose(gemv(x, lin.packed, cfg=fp32, glu=32).float(),
                          silu_mul(gemv(x, plain.packed, cfg=fp32), interleave=32).float(), atol=1e-3, rtol=1e-3)
    want = silu_mul(plain(x), interleave=32)  # whichever path the dispatcher takes for this M
    assert torch.allclose(lin(x).float(), want.float(), atol=1e-3, rtol=1e-3)
    # the torch fallback: the plain projection's columns picked by index, then silu * up
    yp = QuantLinear.from_quantized(qw)._torch_forward(x.cpu()).float()
    gate_cols = torch.tensor([b * 64 + i for b in range(inter // 32) for i in range(32)])
    want_cpu = torch.nn.functional.silu(yp[:, gate_cols]) * yp[:, gate_cols + 32]
    ref = QuantLinear.from_quantized(qw, glu=32)._torch_forward(x.cpu())
    assert torch.allclose(ref.float(), want_cpu, atol=1e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="glu"):
        QuantLinear.from_quantized(qw, glu=48)


@pytest.mark.parametrize("bits,split", [(4, 1), (3, 3)])
def test_glu_gemm_h2_equals_gemm_then_silu_mul(bits, split, gen, device):
    """The fp16-pair tensor-core GEMM's silu-mul epilogue (batch decode) equals the plain product
    followed by silu_mul, with and without split-K."""
    from kernels.decode_ops import interleave_gate_up
    from kernels.dispatch import gemm
    from kernels.layout import pack
    from kernels.tuning import GemmConfig
    from kt_helpers import random_qweight, random_x

    inter, k, m = 96, 384, 5
    qg = random_qweight(inter, k, bits, 128, False, torch.float16, gen)
    qu = random_qweight(inter, k, bits, 128, False, torch.float16, gen)
    qw = type(qg)(interleave_gate_up(qg.qweight, qu.qweight, 32), interleave_gate_up(qg.scale, qu.scale, 32),
                  interleave_gate_up(qg.zero, qu.zero, 32), qg.scheme)
    pw = pack(qw, tile=64, device=device)
    x = random_x(m, k, torch.float16, gen, device)
    cfg = GemmConfig(BM=16, BN=64, h2=True, split=split)
    want = silu_mul(gemm(x, pw, cfg=cfg), interleave=32)
    got = gemm(x, pw, out=torch.full((m, inter), float("nan"), dtype=torch.float16, device=device), cfg=cfg, glu=32)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3), float((got - want).abs().max())


@pytest.mark.parametrize("bits,m,split", [(4, 1, 3), (3, 2, 1), (4, 3, 2), (4, 1, "stream-k")])
def test_accumulating_gemv_adds_into_fp32(bits, m, split, gen, device):
    """gemv(accumulate=True) adds x @ W^T + b into an fp32 buffer (every k-split straight in, the
    bias once): twice gives twice; its 16-bit rounding is the plain GEMV's output; the dispatcher and
    QuantLinear.accumulate (any M) agree. The consumers round fp32 inputs as they read them."""
    from kernels import QuantLinear
    from kernels.dispatch import gemv, matmul
    from kernels.tuning import GemvConfig
    from kt_helpers import random_qweight, random_x

    n, k = 200, 512
    qw = random_qweight(n, k, bits, 128, False, torch.float16, gen)
    bias = torch.randn(n, generator=gen).half().to(device)
    lin = QuantLinear.from_quantized(qw, bias.cpu()).to(device)
    x = random_x(m, k, torch.float16, gen, device)
    cfg = (GemvConfig(BN=64, R=4, h2=True, stream_k=True, waves=2.5) if split == "stream-k"
           else GemvConfig(BN=64, R=4, h2=True, split=split))
    plain = gemv(x, lin.packed, bias, cfg=cfg)
    acc = torch.zeros(m, n, dtype=torch.float32, device=device)
    gemv(x, lin.packed, bias, out=acc, cfg=cfg, accumulate=True)
    assert torch.allclose(acc.half().float(), plain.float(), atol=1e-3, rtol=1e-3)
    once = acc.clone()
    gemv(x, lin.packed, bias, out=acc, cfg=cfg, accumulate=True)
    assert torch.allclose(acc, 2 * once, atol=1e-3, rtol=1e-5)
    acc2 = torch.zeros_like(acc)
    assert matmul(x, lin.packed, bias, acc_out=acc2) is acc2
    assert torch.allclose(acc2.half().float(), lin(x).float(), atol=1e-3, rtol=1e-3)
    acc3 = torch.zeros_like(acc)
    lin.accumulate(x, acc3)
    assert torch.allclose(acc3, acc2, atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        gemv(x, lin.packed, bias, out=torch.zeros(m, n, dtype=torch.float16, device=device), accumulate=True)
    # consumers: an fp32 input is read as its fp16 rounding
    res = torch.randn(m, n, generator=gen).half().to(device)
    w = (1 + 0.1 * torch.randn(n, generator=gen)).half().to(device)
    r16, r32 = res.clone(), res.clone()
    y16 = add_rmsnorm(acc2.half(), r16, w, 1e-6)
    y32 = add_rmsnorm(acc2, r32, w, 1e-6)
    assert torch.equal(r16.cpu(), r32.cpu()) and torch.equal(y16.cpu(), y32.cpu())


def test_rope_attention_reads_fp32_qkv_as_fp16(gen, device):
    b, hq, hkv, d, length, pos = 1, 4, 2, 16, 40, 33
    qkv = (torch.randn(b, (hq + 2 * hkv) * d, generator=gen) * 3).to(device)  # fp32, not fp16-exact
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(device)
    kc = torch.randn(b, hkv, length, d, generator=gen).half().to(device)
    vc = torch.randn(b, hkv, length, d, generator=gen).half().to(device)
    p = torch.tensor([pos], dtype=torch.int32, device=device)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    a = rope_attention(qkv, inv_freq, p, k1, v1, hq, hkv, block=16)
    b16 = rope_attention(qkv.half(), inv_freq, p, k2, v2, hq, hkv, block=16)
    assert a.dtype == torch.float16
    assert torch.equal(a.cpu(), b16.cpu()) and torch.equal(k1.cpu(), k2.cpu()) and torch.equal(v1.cpu(), v2.cpu())


@pytest.mark.parametrize("m,glu", [(3, 0), (16, 32), (40, 0)])
def test_dispatcher_default_small_m_is_the_fp16_pair_gemm(m, glu, gen, device, monkeypatch):
    """Autotuner off (CPU, VLMQ_AUTOTUNE=0): 2 < M <= 64 with fp16 x goes to the fp16-pair GEMM (the
    autotuner's pick on the H100 at M=4 and 16), with accumulate and glu in the kernel; the products
    match float64 (tile 64: BN64; tile 128: BN128)."""
    import kernels.gemm_h2 as gh
    from kernels.dispatch import matmul
    from kernels.layout import pack
    from kernels.reference import linear_ref, weight_f64
    from kt_helpers import assert_matches, random_qweight, random_x

    calls = []
    real = gh.gemm_h2_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(gh, "gemm_h2_kernel", Spy())
    n, k = 256, 384
    qw = random_qweight(n, k, 4, 128, False, torch.float16, gen)
    for tile in (64, 128):
        pw = pack(qw, tile=tile, device=device)
        x = random_x(m, k, torch.float16, gen, device)
        ref = linear_ref(x.cpu(), qw)
        if glu:  # x scaled down: silu(gate) * up of random weights overflows fp16 otherwise
            x = x / 16
            want = silu_mul(matmul(x, pw), interleave=glu)
            got = matmul(x, pw, glu=glu)
            assert torch.isfinite(got).all()
            assert torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3), float((got - want).abs().max())
        else:
            assert_matches(matmul(x, pw), ref, x, weight_f64(qw), torch.float16, slack=3.0)
            acc = torch.zeros(m, n, dtype=torch.float32, device=device)
            assert matmul(x, pw, acc_out=acc) is acc
            assert_matches(acc.half(), ref, x, weight_f64(qw), torch.float16, slack=3.0)
    assert len(calls) == 4  # every product above ran the fp16-pair GEMM


def test_decode_variant_names():
    """The bench's variant grammar: layer bits, W4A8, and the packed head with the layers' or its own bits."""
    from pipeline.evaluate.bench_decode import parse_variant

    assert parse_variant("fp16") == (16, 16, None)
    assert parse_variant("w4") == (4, 16, None)
    assert parse_variant("w3+head") == (3, 16, 3)
    assert parse_variant("w3+head4") == (3, 16, 4)
    assert parse_variant("w4a8") == (4, 8, None)
    for bad in ("w5", "w4+head5", "fp8", "w4a8+head", "w4+hed"):
        with pytest.raises(ValueError, match="variant|weight-only"):
            parse_variant(bad)


def test_decode_whatif_leaves_out_what_it_names(monkeypatch, gen, device):
    """VLMQ_DECODE_WHATIF (a timing experiment) really drops the RMSNorms / the attention: the step's
    logits change, the KV cache is left unwritten without attention, and an unknown name is refused."""
    from pipeline.evaluate.bench_decode import DecodeModel, config_for

    cfg = config_for(tiny=True, layers=2)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.vocab_size = 128, 256, 4, 300
    tok = int(torch.randint(0, 300, (1,), generator=gen))
    logits = {}
    for whatif in ("", "norm", "attn"):
        monkeypatch.setenv("VLMQ_DECODE_WHATIF", whatif)
        model = DecodeModel(cfg, "w4", 1, 16, device, group=64, seed=5)
        model.tokens.fill_(tok)
        model.step()
        logits[whatif] = model.logits.float().cpu()
        written = bool(model.layers[0]["k_cache"][:, :, 0].abs().sum() > 0)
        assert written == (whatif != "attn")
    assert torch.isfinite(logits[""]).all()
    for whatif in ("norm", "attn"):
        assert (logits[whatif] - logits[""]).abs().max() > 1e-3 * logits[""].abs().max()
    monkeypatch.setenv("VLMQ_DECODE_WHATIF", "norm,mlp")
    with pytest.raises(ValueError, match="mlp"):
        DecodeModel(cfg, "w4", 1, 16, device, group=64)
