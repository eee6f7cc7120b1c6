"""Weight-only kernels (GEMV and dequant-tile GEMM) against the float64 fake-quant reference.

Runs in the Triton interpreter on CPU. Outputs are poisoned with NaN before each launch, shapes
are odd (N not a multiple of the block, K not a multiple of 128 where the scheme allows it), and
inputs are fresh random draws every run.
"""

import pytest
import torch

from kernels.dispatch import gemm, gemv, matmul
from kernels.layout import pack
from kernels.reference import linear_ref, weight_f64
from kernels.tuning import GemmConfig, GemvConfig

from kt_helpers import assert_matches, random_qweight, random_x


def _k(group, bits):
    return 100 if group is None else 3 * group  # per-channel: K not a multiple of any block


def _run_gemv(m, n, bits, group, sym, dtype, gen, device, split, bias=False, r=4, h2=None, depth=1,
              stream_k=False, waves=8.0, x_ahead=True):
    k = _k(group, bits)
    qw = random_qweight(n, k, bits, group, sym, dtype, gen)
    pw = pack(qw, tile=32, device=device)
    x = random_x(m, k, dtype, gen, device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    y = gemv(x, pw, b, out=out, cfg=GemvConfig(BN=32, R=r, split=split, h2=h2, depth=depth, stream_k=stream_k,
                                                waves=waves, x_ahead=x_ahead))
    assert y is out
    assert_matches(y, linear_ref(x.cpu(), qw, None if b is None else b.cpu()), x, weight_f64(qw), dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, 128, None])
def test_gemv_fp16(bits, sym, group, gen, device):
    _run_gemv(1, 37, bits, group, sym, torch.float16, gen, device, split=1)
    _run_gemv(3, 37, bits, group, sym, torch.float16, gen, device, split=2, bias=True)


@pytest.mark.parametrize("bits,sym,group", [(4, False, 128), (3, True, None), (3, False, 32)])
def test_gemv_fp32_path_fp16(bits, sym, group, gen, device):
    """W4/W3 with fp16 x go to the fp16-pair kernel by default (test_gemv_fp16 runs its portable
    twin here); the fp32 kernel stays an autotuner candidate, so it is checked too."""
    _run_gemv(3, 37, bits, group, sym, torch.float16, gen, device, split=2, bias=True, h2=False)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, None)])
def test_gemv_h2_depth2(bits, group, gen, device):
    """Loads issued two iterations ahead (the clamped tail re-reads its own tile)."""
    _run_gemv(3, 37, bits, group, False, torch.float16, gen, device, split=2, bias=True, h2=True, depth=2)
    _run_gemv(1, 37, bits, group, True, torch.float16, gen, device, split=1, h2=True, depth=2)


@pytest.mark.parametrize("bits,group", [(3, 32), (3, None), (4, 128), (4, None)])
def test_gemv_h2_x_where_used(bits, group, gen, device):
    """Only the words an iteration ahead, x loaded in the iteration that uses it (run 12: W3 72 -> 64
    registers); k-splits, masked rows of x and per-channel (K not a multiple of the block) included."""
    _run_gemv(3, 37, bits, group, False, torch.float16, gen, device, split=2, bias=True, h2=True, x_ahead=False)
    _run_gemv(1, 37, bits, group, True, torch.float16, gen, device, split=None, h2=True, stream_k=True,
              waves=1.5, x_ahead=False)


@pytest.mark.parametrize("bits,group,k,r", [(4, 32, 512, 32), (3, 128, 768, 8), (3, 32, 1024, 16), (4, None, 512, 32),
                                             (3, 128, 384, 8)])
def test_gemv_h2_iteration_spans_groups(bits, group, k, r, gen, device):
    """R wider than a 128-k block: one iteration over several groups, each row with its own group's
    scale and zero (W3 g32: 16 groups per iteration). (3, 128, 384, 8): 12 real rows, which R 8 does
    not divide, so the dispatcher falls back to R 4. Split, stream-K, accumulate and two iterations in
    flight (depth 2, the decode candidates) included."""
    qw = random_qweight(37, k, bits, group, False, torch.float16, gen)
    pw = pack(qw, tile=32, device=device)
    for m, kw in ((1, dict(split=1)), (3, dict(split=2)), (2, dict(stream_k=True, waves=1.5)), (1, dict(acc=True)),
                  (1, dict(acc=True, depth=2, split=2)), (2, dict(depth=2))):
        acc = kw.pop("acc", False)
        x = random_x(m, k, torch.float16, gen, device)
        cfg = GemvConfig(BN=32, R=r, num_warps=4, h2=True, **kw)
        if acc:
            base = torch.randn(m, 37, generator=gen).float().to(device)
            y = gemv(x, pw, out=base.clone(), cfg=cfg, accumulate=True)
            want = linear_ref(x.cpu(), qw) + base.cpu().double()
        else:
            out = torch.full((m, 37), float("nan"), dtype=torch.float16, device=device)
            y = gemv(x, pw, out=out, cfg=cfg)
            want = linear_ref(x.cpu(), qw)
        assert_matches(y, want, x, weight_f64(qw), torch.float16)


def test_gemv_x_where_used_needs_depth_1(gen, device):
    qw = random_qweight(9, 128, 4, 32, False, torch.float16, gen)
    pw = pack(qw, tile=32, device=device)
    with pytest.raises(ValueError, match="x_ahead"):
        gemv(random_x(1, 128, torch.float16, gen, device), pw,
             cfg=GemvConfig(BN=32, R=4, h2=True, depth=2, x_ahead=False))


@pytest.mark.parametrize("bits,group,waves", [(4, 32, 1.5), (3, None, 2.0), (4, 128, 0.5), (3, 32, 64.0)])
def test_gemv_h2_stream_k(bits, group, waves, gen, device):
    """Stream-K: the (tile, iteration) units dealt out evenly to waves x SMs programs (4 SMs on CPU),
    so ranges start and end inside tiles and a tile has 1 to several contributors (0.5: two
    programs, each over whole tiles; 64: one unit per program)."""
    _run_gemv(3, 37, bits, group, False, torch.float16, gen, device, split=None, bias=True, h2=True,
              stream_k=True, waves=waves)
    _run_gemv(1, 37, bits, group, True, torch.float16, gen, device, split=None, h2=True, stream_k=True,
              waves=waves)


def test_gemv_h2_stream_k_ranges_cross_tiles(gen, device):
    """16 iterations per tile, 7 units per program: every range but the first starts mid-tile and
    some span two tiles; 2 or 3 programs add into each tile through the counters."""
    qw = random_qweight(100, 512, 4, 128, False, torch.float16, gen)
    pw = pack(qw, tile=32, device=device)
    x = random_x(2, 512, torch.float16, gen, device)
    out = torch.full((2, 100), float("nan"), dtype=torch.float16, device=device)
    y = gemv(x, pw, out=out, cfg=GemvConfig(BN=32, R=4, h2=True, stream_k=True, waves=2.5))
    assert_matches(y, linear_ref(x.cpu(), qw), x, weight_f64(qw), torch.float16)


def test_gemv_h2_needs_k_multiple_of_4(gen, device):
    """K % 4 != 0: the dispatcher falls back to the fp32 kernel; asking for fp16 pairs is an error."""
    qw = random_qweight(9, 98, 4, None, False, torch.float16, gen)
    pw = pack(qw, tile=32, device=device)
    x = random_x(1, 98, torch.float16, gen, device)
    assert_matches(gemv(x, pw, cfg=GemvConfig(BN=32, R=4)), linear_ref(x.cpu(), qw), x, weight_f64(qw), torch.float16)
    with pytest.raises(ValueError, match="fp16-pair"):
        gemv(x, pw, cfg=GemvConfig(BN=32, R=4, h2=True))


@pytest.mark.parametrize("bits,sym,group", [(4, False, 64), (3, True, 64), (8, False, None), (2, False, 32)])
def test_gemv_bf16(bits, sym, group, gen, device):
    _run_gemv(2, 33, bits, group, sym, torch.bfloat16, gen, device, split=3, bias=True)


@pytest.mark.parametrize("n", [1, 5, 32])
def test_gemv_small_n(n, gen, device):
    _run_gemv(1, n, 4, 64, False, torch.float16, gen, device, split=2)


def _run_gemm(m, n, bits, group, sym, dtype, gen, device, cfg, bias=False, tile=32):
    k = _k(group, bits)
    qw = random_qweight(n, k, bits, group, sym, dtype, gen)
    pw = pack(qw, tile=tile, device=device)
    x = random_x(m, k, dtype, gen, device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    y = gemm(x, pw, b, out=out, cfg=cfg)
    # the tile is rounded to 16 bits before the dot: one more rounding than the GEMV
    assert_matches(y, linear_ref(x.cpu(), qw, None if b is None else b.cpu()), x, weight_f64(qw), dtype, slack=3.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [64, None])
def test_gemm_fp16(bits, sym, group, gen, device):
    bk = 32 if bits == 3 else 64
    _run_gemm(19, 37, bits, group, sym, torch.float16, gen, device, GemmConfig(BM=16, BN=32, BK=bk, split=1))
    _run_gemm(5, 37, bits, group, sym, torch.float16, gen, device,
              GemmConfig(BM=16, BN=32, BK=bk, split=2, trans=True), bias=True)


@pytest.mark.parametrize("bits,sym,group", [(4, False, 32), (3, False, None), (8, True, 128)])
def test_gemm_bf16(bits, sym, group, gen, device):
    _run_gemm(17, 33, bits, group, sym, torch.bfloat16, gen, device, GemmConfig(BM=16, BN=32, BK=32, split=2),
              bias=True)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym,group", [(False, 128), (True, 32), (False, None), (True, None), (False, 64)])
def test_gemm_h2(bits, sym, group, gen, device):
    """fp16-pair tensor-core GEMM (fragment-ordered tile, x permuted to match): odd M, N and K,
    split-K and bias, several M blocks."""
    cfg = GemmConfig(BM=16, BN=64, h2=True, split=2)
    _run_gemm(5, 37, bits, group, sym, torch.float16, gen, device, cfg, bias=True, tile=64)
    _run_gemm(17, 130, bits, group, sym, torch.float16, gen, device, GemmConfig(BM=16, BN=128, h2=True), tile=128)
    # tile rows in the 16-byte-load column order (run 13), split-K with bias, every scheme
    _run_gemm(19, 300, bits, group, sym, torch.float16, gen, device,
              GemmConfig(BM=16, BN=128, h2=True, split=2, perm=True), bias=True, tile=128)
    if group == 128:  # four 64-row slabs (two warpgroups of 8 warps on the GPU)
        _run_gemm(3, 200, bits, group, sym, torch.float16, gen, device,
                  GemmConfig(BM=16, BN=256, h2=True, num_warps=8, split=3), tile=256)
        _run_gemm(37, 130, bits, group, sym, torch.float16, gen, device,
                  GemmConfig(BM=32, BN=128, h2=True, perm=True), tile=128)
        # one group per k-block: the scale in the tile (the default from BM 32) and after the dot, both BMs
        for bm, after in ((32, None), (32, True), (16, False)):
            _run_gemm(37, 70, bits, group, sym, torch.float16, gen, device,
                      GemmConfig(BM=bm, BN=64, h2=True, split=2, scale_after=after), bias=True, tile=64)


def test_gemm_h2_accumulate_and_refusals(gen, device):
    """Accumulate mode adds (twice gives twice); bf16 x, W8, a BN the kernel cannot map and a 16-bit
    accumulator are refused with the reason."""
    qw = random_qweight(70, 256, 4, 128, False, torch.float16, gen)
    pw = pack(qw, tile=64, device=device)
    x = random_x(3, 256, torch.float16, gen, device)
    acc = torch.zeros(3, 70, dtype=torch.float32, device=device)
    cfg = GemmConfig(BM=16, BN=64, h2=True, split=2)
    gemm(x, pw, out=acc, cfg=cfg, accumulate=True)
    gemm(x, pw, out=acc, cfg=cfg, accumulate=True)
    assert_matches(acc / 2, linear_ref(x.cpu(), qw), x, weight_f64(qw), torch.float16, slack=3.0)
    with pytest.raises(ValueError, match="fp16 x"):
        gemm(x.bfloat16(), pw, cfg=cfg)
    with pytest.raises(ValueError, match="multiple of 64"):
        gemm(x, pw, cfg=GemmConfig(BM=16, BN=32, h2=True))
    with pytest.raises(ValueError, match="float32"):
        gemm(x, pw, out=torch.zeros(3, 70, dtype=torch.float16, device=device), cfg=cfg, accumulate=True)
    q8 = random_qweight(70, 256, 8, 128, False, torch.float16, gen)
    with pytest.raises(ValueError, match="3/4-bit"):
        gemm(x, pack(q8, tile=64, device=device), cfg=cfg)


def test_gemm_block_spans_groups(gen, device):
    """BK larger than the group: scales gathered per row inside one tile."""
    _run_gemm(18, 40, 4, 32, False, torch.float16, gen, device, GemmConfig(BM=16, BN=32, BK=128, split=1))


def test_dispatch_and_leading_shapes(gen, device):
    from kernels import QuantLinear

    qw = random_qweight(40, 128, 4, 64, False, torch.float16, gen)
    lin = QuantLinear.from_quantized(qw, None).to(device)
    lin.tile  # noqa: B018
    for shape in [(1, 128), (2, 3, 128), (20, 128)]:
        x = random_x(int(torch.tensor(shape[:-1]).prod()), 128, torch.float16, gen, device).reshape(shape)
        y = lin(x)
        assert y.shape == (*shape[:-1], 40)
        assert_matches(y.reshape(-1, 40), linear_ref(x.reshape(-1, 128).cpu(), qw), x.reshape(-1, 128),
                       weight_f64(qw), torch.float16, slack=3.0)
    assert matmul is not None


def test_checker_catches_one_wrong_code(gen, device):
    """The comparison is sharp enough to see a single wrong code (by half the range) in one column."""
    qw = random_qweight(37, 96, 4, 32, False, torch.float16, gen)
    x = random_x(1, 96, torch.float16, gen, device)
    x[0, 40] = 1.5
    ref = linear_ref(x.cpu(), qw)
    bad = random_qweight(37, 96, 4, 32, False, torch.float16, gen)
    bad.qweight, bad.scale, bad.zero = qw.qweight.clone(), qw.scale.clone(), qw.zero.clone()
    bad.qweight[11, 40] = (bad.qweight[11, 40] + 8) % 16
    y = gemv(x, pack(bad, tile=32, device=device), cfg=GemvConfig(BN=32, R=4, split=1))
    with pytest.raises(AssertionError):
        assert_matches(y, ref, x, weight_f64(qw), torch.float16)


@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (3, 32, True), (2, None, False), (8, 64, False)])
def test_dequantize_bit_exact(bits, group, sym, gen, device):
    """The large-M path's 16-bit weight equals the reference weight rounded once to fp16."""
    from kernels.dispatch import dequantize

    k = _k(group, bits)
    qw = random_qweight(45, k, bits, group, sym, torch.float16, gen)
    w = dequantize(pack(qw, tile=64, device=device))
    assert torch.equal(w.cpu(), weight_f64(qw).half())
    with pytest.raises(ValueError, match="multiple of 64"):  # a 64-row program must not straddle two tiles
        dequantize(pack(qw, tile=32, device=device))


def test_large_transposed_tile_refuses_split_k(gen, device):
    """Run 11: the transposed 256x128 tile's split-K sums were NaN on the H100; asked for, it is a
    clear error; left to dispatch, it runs unsplit (and is exact)."""
    qw = random_qweight(100, 256, 4, 128, False, torch.float16, gen)
    pw = pack(qw, device=device)
    x = random_x(5, 256, torch.float16, gen, device)
    with pytest.raises(ValueError, match="split=1"):
        gemm(x, pw, cfg=GemmConfig(BM=256, BN=128, BK=64, num_warps=8, trans=True, split=2))
    y = gemm(x, pw, out=torch.full((5, 100), float("nan"), dtype=torch.float16, device=device),
             cfg=GemmConfig(BM=256, BN=128, BK=64, num_warps=8, trans=True))
    assert_matches(y, linear_ref(x.cpu(), qw), x, weight_f64(qw), torch.float16, slack=3.0)


def test_dequantize_into_a_given_buffer(gen, device):
    """``dequantize(out=)`` (a reused scratch weight) writes the same values as a fresh one, and a
    buffer of the wrong shape is refused before the launch."""
    from kernels.dispatch import dequantize

    qw = random_qweight(128, 256, 3, 128, False, torch.float16, gen)
    pw = pack(qw, device=device)
    buf = torch.full((128, 256), float("nan"), dtype=torch.float16, device=device)
    assert dequantize(pw, out=buf) is buf
    assert torch.equal(buf, dequantize(pw))
    assert torch.allclose(buf.double().cpu(), weight_f64(qw), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match=r"\[128, 256\]"):
        dequantize(pw, out=torch.empty(256, 128, dtype=torch.float16, device=device))


def test_outgrown_workspace_stays_allocated():
    """A graph captured at a small batch keeps the split-K workspace it saw: growing it for a larger
    batch must not free that memory (the replay would read freed memory)."""
    import weakref

    from kernels import dispatch

    dev = torch.device("cpu")
    key = ("test-pool", "cpu", None)
    dispatch._WS.pop(key, None)
    small, _ = dispatch.workspace(dev, 10, 4, pool="test-pool")
    ref = weakref.ref(small)
    big, _ = dispatch.workspace(dev, small.numel() + 1, 4, pool="test-pool")
    assert big.numel() >= 2 * small.numel()
    del small
    assert ref() is not None  # still held for the graphs captured before the growth
    again, _ = dispatch.workspace(dev, 10, 4, pool="test-pool")
    assert again is big  # smaller requests reuse the live buffer
    dispatch._WS.pop(key)
    dispatch._RETIRED[:] = [p for p in dispatch._RETIRED if p[0] is not ref()]
