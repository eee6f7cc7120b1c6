"""The capture wavefront -> activation store -> block calibration: replaying layer i (from the
whole model) on what was captured for it must give what was captured for layer i + 1, for every
family (M-RoPE included), with the samples split into two groups."""

import pytest
import torch

from pipeline.config import QuantRecipe
from pipeline.data.collate import build_calibration_table, save_table
from pipeline.data.sources import open_calib_source
from pipeline.distributed.wavefront import WavefrontWorker
from pipeline.distributed.context import JobContext
from pipeline.distributed.search import load_block_calib
from pipeline.models import ADAPTERS, detect_adapter
from pipeline.models.loading import build_layers
from pipeline.models.processors import load_processor
from pipeline.models.weights import open_source
from pipeline.quant.types import layer_forward


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "internvl", "llava_onevision"])
def test_replay_matches_capture(tiny_dirs, tmp_path, family):
    model_dir = tiny_dirs[family]
    source = open_source(model_dir)
    adapter = detect_adapter(source.config_dict)
    processor = load_processor(model_dir)
    from transformers import AutoConfig

    vision_id = adapter.image_token_id(AutoConfig.from_pretrained(model_dir))
    table, _ = build_calibration_table(open_calib_source("builtin", num_samples=3, seed=1).rows(), processor,
                                       vision_id, max_rows=3)
    save_table(table, tmp_path / "calib.arrow")
    ctx = JobContext(model=str(model_dir), family=adapter.family, recipe=QuantRecipe(method="awq"),
                     work_dir=str(tmp_path), store_root=str(tmp_path / "acts"), compute_dtype="float32",
                     storage_dtype="float16", options={"groups": 2})
    workers = [WavefrontWorker(ctx, g, 2, str(tmp_path / "calib.arrow"), rows) for g, rows in enumerate([[0, 1], [2]])]
    n_layers = workers[0].n_layers
    for w in workers:
        w.embed()
        for i in range(n_layers):
            w.forward(i)
        assert w.forward(0)["skipped"]  # idempotent: a retried call does no work
    layers = build_layers(source, ADAPTERS[adapter.family], list(range(n_layers)), dtype=torch.float32, device="cpu")
    c0 = load_block_calib(ctx, 0, None)
    c1 = load_block_calib(ctx, 1, None)
    assert len(c0.samples) == 3
    for s0, s1 in zip(c0.samples, c1.samples):
        assert s0.vision_mask.sum() > 0 and s0.answer_mask.sum() > 0
        assert s0.vision_mask.shape[0] == s0.hidden.shape[0]
        with torch.no_grad():
            out = layer_forward(layers[0], s0.hidden, s0.layer_kwargs)
        torch.testing.assert_close(out, s1.hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_layerwise_gradient_pass_equals_whole_model(tiny_dirs, tmp_path, family):
    """MBQ's sensitivity from the reverse wavefront (two groups, one layer resident) equals the
    whole-model autograd pass of pipeline.quant.sensitivity."""
    from pipeline.data.collate import load_table, row_labels, row_masks, row_to_model_inputs
    from pipeline.models.loading import build_model
    from pipeline.quant.sensitivity import merge_stats, model_sensitivity, ratios

    model_dir = tiny_dirs[family]
    source = open_source(model_dir)
    adapter = detect_adapter(source.config_dict)
    from transformers import AutoConfig

    vision_id = adapter.image_token_id(AutoConfig.from_pretrained(model_dir))
    table, _ = build_calibration_table(open_calib_source("builtin", num_samples=3, seed=2).rows(),
                                       load_processor(model_dir), vision_id, max_rows=3)
    save_table(table, tmp_path / "calib.arrow")
    ctx = JobContext(model=str(model_dir), family=adapter.family, recipe=QuantRecipe(method="mbq", wbits=3),
                     work_dir=str(tmp_path), store_root=str(tmp_path / "acts"), compute_dtype="float32",
                     storage_dtype="float16", options={"groups": 2})
    stats = []
    for g, rows in enumerate([[0, 1], [2]]):
        w = WavefrontWorker(ctx, g, 2, str(tmp_path / "calib.arrow"), rows)
        w.embed()
        for i in range(w.n_layers):
            w.forward(i)
        stats.append(w.backward()["stats"])
    got = ratios(merge_stats(*stats), "none")
    model = build_model(source, adapter, dtype=torch.float32)
    layers = model.get_submodule(adapter.layers_path)
    direct = {}
    for r in range(3):
        m = row_masks(table, r)
        direct = merge_stats(direct, model_sensitivity(model, layers, row_to_model_inputs(table, r),
                                                       row_labels(table, r), m["vision_mask"], m["answer_mask"]))
    want = ratios(direct, "none")
    for i in want:
        for k in ("r_attn", "r_mlp"):
            assert got[i][k] == pytest.approx(want[i][k], rel=1e-4, abs=1e-8)
    assert want[0]["r_attn"] > 0
