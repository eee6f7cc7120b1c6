"""Capture -> activation store -> block calibration: replaying layer i on what was captured
for it must give exactly what was captured for layer i + 1 (every family, M-RoPE included)."""

import pytest
import torch

from pipeline.config import QuantRecipe
from pipeline.data.collate import build_calibration_table, save_table
from pipeline.data.sources import open_calib_source
from pipeline.distributed.capture import CaptureWorker
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
    ctx = JobContext(model=str(model_dir), family=adapter.family, recipe=QuantRecipe(), work_dir=str(tmp_path),
                     store_root=str(tmp_path / "acts"), compute_dtype="float32", storage_dtype="float16")
    worker = CaptureWorker(ctx)
    n_layers = worker.begin()
    worker.capture_batch(str(tmp_path / "calib.arrow"), [0, 1, 2])
    stats = worker.finish()
    assert stats["samples"] == 3
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
