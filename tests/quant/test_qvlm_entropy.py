"""Q-VLM entropy profile and partition against closed forms and hand-computed examples."""

import json
import math

import pytest
import torch

from pipeline.quant.entropy import (EntropyAccumulator, EntropyProfile, conditional_entropy, histogram_entropy,
                                    robust_range, soft_entropy, subsample_tokens, token_codes)
from pipeline.quant.partition import partition, plot_partition, quantile_threshold
from pipeline.quant.quantizer import fake_quantize_activations


# ------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("k", [1, 5, 16])
def test_uniform_over_k_bins_is_log_k_fixed_grid(k):
    # 16 bins of width 1 over [0, 16); each of the first k bins holds 3 values (bin centres)
    x = (torch.arange(k, dtype=torch.float32) + 0.5).repeat(3).reshape(-1, 1)
    acc = EntropyAccumulator(bits=4, grid="fixed", value_range=(0.0, 16.0), max_tokens=None)
    acc.update(x)
    assert acc.hist.sum() == 3 * k and acc.tokens == 3 * k
    assert acc.entropy() == pytest.approx(math.log(k), abs=1e-12)


def test_uniform_over_token_grid_codes_is_log_255():
    # one token holding every int8 level once, scaled: its per-token codes are -127..127 exactly
    x = (torch.arange(-127, 128, dtype=torch.float32) * 0.37).reshape(1, -1)
    acc = EntropyAccumulator(bits=8, max_tokens=None)
    acc.update(x)
    assert (acc.hist[1:] == 1).all() and acc.hist[0] == 0
    assert acc.entropy() == pytest.approx(math.log(255), abs=1e-12)


def test_point_mass_is_zero():
    acc = EntropyAccumulator(bits=8, max_tokens=None)
    acc.update(torch.zeros(7, 32))
    assert acc.entropy() == 0.0 and acc.hist[128] == 7 * 32
    fixed = EntropyAccumulator(bits=8, grid="fixed", value_range=(-1.0, 1.0))
    fixed.update(torch.full((5, 9), 0.3))
    assert fixed.entropy() == 0.0


def test_token_codes_are_the_activation_quantizer_codes():
    x = torch.randn(13, 64) * torch.rand(13, 1) * 5
    for bits in (4, 6, 8):
        qmax = 2 ** (bits - 1) - 1
        s = x.abs().amax(-1, keepdim=True) / qmax
        codes = token_codes(x, bits)
        assert codes.min() >= 0 and codes.max() < 2**bits
        torch.testing.assert_close((codes - 2 ** (bits - 1)).float() * s, fake_quantize_activations(x, bits),
                                   rtol=0, atol=1e-6)


def test_histogram_entropy_two_bin_closed_form():
    # p = (1/4, 3/4): H = -(1/4 log 1/4 + 3/4 log 3/4)
    assert histogram_entropy(torch.tensor([1, 0, 3])) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-12)


def test_conditional_entropy_hand_table():
    # x0: y uniform over 2 -> log 2; x1: y fixed -> 0; p(x0) = 1/2 -> H(Y|X) = 0.5 log 2
    assert conditional_entropy(torch.tensor([[2, 2], [0, 4]])) == pytest.approx(0.5 * math.log(2), abs=1e-12)


def test_conditional_entropy_of_identical_inputs_is_zero():
    x = torch.randn(40, 64)
    acc = EntropyAccumulator(bits=8, joint_bits=6, max_tokens=None)
    acc.update(x, x)
    assert acc.pair_tokens == 40 and acc.entropy() > 3.0
    assert acc.dependency() == 0.0
    prof = EntropyProfile(2, max_tokens=None)
    prof.observe(0, x)
    prof.observe(1, x.clone())
    assert prof.dependencies() == [0.0]


def test_conditional_entropy_of_independent_inputs_is_the_marginal_entropy():
    # joint counts are exactly p(x) p(y) N: x in 2 bins with weights (1, 3), y in 3 bins with (1, 2, 5)
    xs, ys = [], []
    for bx, wx in ((0, 1), (1, 3)):
        for by, wy in ((0, 1), (1, 2), (2, 5)):
            xs += [bx + 0.5] * (wx * wy)
            ys += [by + 0.5] * (wx * wy)
    x = torch.tensor(xs).reshape(-1, 1)
    y = torch.tensor(ys).reshape(-1, 1)
    acc = EntropyAccumulator(bits=3, joint_bits=3, grid="fixed", value_range=(0.0, 8.0), max_tokens=None)
    acc.update(x, y)
    h_y = -sum(p * math.log(p) for p in (1 / 8, 2 / 8, 5 / 8))
    assert acc.dependency() == pytest.approx(h_y, abs=1e-12)
    ay = EntropyAccumulator(bits=3, grid="fixed", value_range=(0.0, 8.0), max_tokens=None)
    ay.update(y)
    assert acc.dependency() == pytest.approx(ay.entropy(), abs=1e-12)


def test_joint_coarsening_keeps_pairs_of_the_same_element():
    # y = x shifted by exactly one joint bin (4 fine bins): a deterministic map -> D = 0, H(Y) > 0
    x = torch.arange(0, 48, dtype=torch.float32).reshape(-1, 1) + 0.5
    acc = EntropyAccumulator(bits=6, joint_bits=4, grid="fixed", value_range=(0.0, 64.0), max_tokens=None)
    acc.update(x, x + 4)
    assert acc.joint.sum() == 48 and acc.dependency() == 0.0
    assert histogram_entropy(acc.joint.sum(0)) == pytest.approx(math.log(12), abs=1e-12)


def _samples(n, layers=4, T=37, C=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xs = [torch.randn(T, C, generator=g)]
        for _ in range(layers - 1):  # a residual-like chain so consecutive layers are dependent
            xs.append(xs[-1] + 0.5 * torch.randn(T, C, generator=g))
        out.append(xs)
    return out


def test_merged_profiles_equal_one_profile_over_all_data_and_survive_json():
    data = _samples(5)
    whole, a, b = (EntropyProfile(4, max_tokens=16) for _ in range(3))
    for j, xs in enumerate(data):
        for i, x in enumerate(xs):
            whole.observe(i, x)
            (a if j < 2 else b).observe(i, x)
        whole.end_sample(), a.end_sample(), b.end_sample()
    merged = EntropyProfile.from_dict(json.loads(json.dumps(a.merge(b).to_dict())))
    for m, w in zip(merged.accs, whole.accs):
        assert torch.equal(m.hist, w.hist) and torch.equal(m.joint, w.joint)
        assert m.tokens == w.tokens == 5 * 16
    assert merged.entropies() == whole.entropies()
    assert merged.dependencies() == whole.dependencies()
    assert all(0 < d < h for d, h in zip(whole.dependencies(), whole.entropies()[1:]))


def test_shard_boundary_pair_is_counted_once():
    """Two capture shards (layers 0-1 and 2-3): the first also feeds layer 2's input, pair only."""
    data = _samples(3)
    whole, s1, s2 = (EntropyProfile(4, max_tokens=None) for _ in range(3))
    for xs in data:
        for i, x in enumerate(xs):
            whole.observe(i, x)
        for i in (0, 1):
            s1.observe(i, xs[i])
        s1.observe(2, xs[2], marginal=False)
        for i in (2, 3):
            s2.observe(i, xs[i])
        for p in (whole, s1, s2):
            p.end_sample()
    merged = s1.merge(s2)
    for m, w in zip(merged.accs, whole.accs):
        assert torch.equal(m.hist, w.hist) and torch.equal(m.joint, w.joint)


def test_accumulator_merge_refuses_different_bins():
    a = EntropyAccumulator(grid="fixed", value_range=(0.0, 1.0))
    b = EntropyAccumulator(grid="fixed", value_range=(0.0, 2.0))
    with pytest.raises(ValueError):
        a.merge(b)


def test_subsample_and_robust_range():
    assert subsample_tokens(10, None) is None and subsample_tokens(10, 10) is None
    assert subsample_tokens(9, 3).tolist() == [0, 4, 8]
    x = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([1000.0])])
    lo, hi = robust_range(x, q=0.99)
    assert -1 <= lo < -0.9 and 0.9 < hi <= 1.0  # the single outlier does not set the range


def test_soft_entropy_matches_closed_forms_and_has_gradients():
    bins = 9  # centres at u = -1, -0.75, ..., 1
    centres = torch.linspace(-1, 1, bins)
    x = centres[torch.tensor([0, 2, 4, 6, 8])].repeat(4).reshape(1, -1) * 3.0  # 5 centres, equally often
    assert float(soft_entropy(x, bins)) == pytest.approx(math.log(5), abs=1e-6)
    assert float(soft_entropy(torch.full((3, 8), 2.0), bins)) == pytest.approx(0.0, abs=1e-6)
    # halfway between two centres: the mass splits evenly -> log 2
    y = torch.tensor([[1.0, -0.875 / 1.0]])  # u = 1 (a centre) and -0.875 (between -1 and -0.75)
    h = float(soft_entropy(y, bins))
    assert h == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-6)
    z = torch.randn(6, 32, requires_grad=True)
    soft_entropy(z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- partition

SCORES = [5.0, 1.0, 4.0, 3.0, 6.0, 2.0, 7.0, 8.0]


def test_quantile_threshold_linear_interpolation():
    assert quantile_threshold(SCORES, 0.5) == 4.5  # sorted 1..8, position 3.5
    assert quantile_threshold(SCORES, 0.25) == 2.75  # position 1.75 between 2 and 3
    assert quantile_threshold([float("nan")] + SCORES[1:], 0.5) == 4.0  # NaN ignored; 1,2,3,4,6,7,8


def test_partition_entropy_hand_computed():
    # tau = 4.5: layers with score >= 4.5 join (4: 6, 6: 7, 7: 8), blocks capped at 3
    assert partition(SCORES, p=0.5, max_block_layers=3) == [[0], [1], [2], [3, 4], [5, 6, 7]]
    assert partition(SCORES, p=0.5, max_block_layers=2) == [[0], [1], [2], [3, 4], [5, 6], [7]]
    # tau = 2.75: 2, 3 join 1; 4 would be a 4th layer -> new block; 6, 7 join 5
    assert partition(SCORES, p=0.25, max_block_layers=3) == [[0], [1, 2, 3], [4], [5, 6, 7]]
    assert partition(SCORES, p=0.5, max_block_layers=1) == [[i] for i in range(8)]


def test_partition_dependency_hand_computed():
    dep = [float("nan")] + SCORES[1:]  # D(i-1, i); tau = 4 over 1,4,3,6,2,7,8
    assert partition(dep, p=0.5, max_block_layers=3, mode="dependency") == [[0], [1, 2], [3, 4], [5, 6, 7]]


def test_partition_fixed_and_errors():
    assert partition(SCORES, max_block_layers=3, mode="fixed") == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert partition(SCORES[:6], max_block_layers=2, mode="fixed") == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError):
        partition(SCORES, mode="nope")
    with pytest.raises(ValueError):
        partition(SCORES, max_block_layers=0)


def test_profile_scores_feed_the_partition():
    prof = EntropyProfile(4, max_tokens=None)
    for xs in _samples(2):
        for i, x in enumerate(xs):
            prof.observe(i, x)
        prof.end_sample()
    dep = prof.scores("dependency")
    assert math.isnan(dep[0]) and dep[1:] == prof.dependencies()
    blocks = partition(dep, mode="dependency")
    assert sorted(i for b in blocks for i in b) == [0, 1, 2, 3]


def test_plot_partition_draws_boundaries():
    blocks = partition(SCORES, p=0.5)
    fig = plot_partition(SCORES, blocks, tau=quantile_threshold(SCORES, 0.5))
    ax = fig.axes[0]
    vertical = [ln for ln in ax.lines if len(set(ln.get_xdata())) == 1]
    assert sorted(ln.get_xdata()[0] for ln in vertical) == [0.5, 1.5, 2.5, 4.5]
    assert list(ax.lines[-2].get_ydata()) == SCORES  # the score curve, then tau


def test_wavefront_and_hook_feeding_count_the_same():
    """Two ways the capture pass can feed the profile, on a tiny LLaVA: (a) the layer-major
    wavefront replays layer i on its input stream and calls ``acc[i].update(h_in, h_out)``;
    (b) a forward pre-hook on every layer of a whole-model forward calls ``profile.observe(i, h)``.
    Both count exactly the same histograms (replay is exact, pairing uses the same tokens)."""
    from pipeline.models.families import LLAVA
    from pipeline.models.layer_io import capture_layer_io
    from pipeline.models.tiny import build_tiny_model
    from pipeline.quant.types import layer_forward

    model, _ = build_tiny_model("llava", seed=0)
    layers = model.get_submodule(LLAVA.layers_path)
    n = len(layers)
    g = torch.Generator().manual_seed(0)
    prof = EntropyProfile(n, max_tokens=24)
    wave = [EntropyAccumulator(max_tokens=24) for _ in range(n)]
    batches = []
    for _ in range(2):
        ids = torch.randint(10, 300, (1, 40), generator=g)
        ids[0, 2:18] = model.config.image_token_id
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "pixel_values": torch.randn(1, 3, 28, 28, generator=g)})
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: prof.observe(i, (args[0] if args else kwargs["hidden_states"])[0]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:  # (b): counted by the hooks during whole-model forwards
        for inputs in batches:
            with torch.no_grad():
                model(**inputs, use_cache=False)
            prof.end_sample()
    finally:
        for hd in handles:
            hd.remove()
    for inputs in batches:  # (a): the wavefront, from layer 0's input and kwargs only
        ins, _, kw = capture_layer_io(model, layers, inputs)
        h = ins[0][0]
        with torch.no_grad():
            for i in range(n):
                out = layer_forward(layers[i], h, kw) if i + 1 < n else None
                wave[i].update(h, out)
                h = out
    merged = EntropyProfile.from_accumulators(wave)
    for a, b in zip(prof.accs, merged.accs):
        assert torch.equal(a.hist, b.hist) and torch.equal(a.joint, b.joint)
    assert all(math.isfinite(d) and d > 0 for d in prof.dependencies())
