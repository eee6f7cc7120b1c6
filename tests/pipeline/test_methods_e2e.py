"""Issue 4 (f): MBQ W3 and W4A8 jobs on every family produce checkpoints `validate` accepts,
with sane sensitivity ratios and W4A8's activation scheme in the config."""

import json

import pytest

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.config import spec_from_dict
from pipeline.distributed.job import run_quantize
from pipeline.distributed.progress import JobView

pytestmark = pytest.mark.slow
FAMILIES = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl"]


def _job(model, out, **recipe):
    spec = spec_from_dict({"model": str(model), "out": str(out), "recipe": recipe, "resources": {"device": "cpu"},
                           "calib": {"source": "builtin", "num_samples": 3, "holdout": 1}})
    return run_quantize(spec, JobView(quiet=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_mbq_w3(ray_local, tiny_dirs, tmp_path, family):
    res = _job(tiny_dirs[family], tmp_path / "out", method="mbq", wbits=3, group_size=32)
    assert res.report["validation"]["ok"] and validate_checkpoint(res.out).ok
    ratios = res.report["sensitivity"]["ratios"]
    layers = json.loads((tiny_dirs[family] / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(ratios) == layers
    for r in ratios.values():  # mean |grad| ratios: never negative, never NaN
        assert r["r_attn"] >= 0 and r["r_mlp"] >= 0
    unfloored = res.report["sensitivity"]["unfloored"]
    assert unfloored[str(layers - 1)]["r_attn"] == 0.0  # vision tokens cannot reach the loss from the top layer
    assert any(b["metrics"] for b in res.report["blocks"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["mbq", "smoothquant"])
def test_w4a8(ray_local, tiny_dirs, tmp_path, family, method):
    res = _job(tiny_dirs[family], tmp_path / "out", method=method, wbits=4, abits=8)
    assert res.report["validation"]["ok"]
    qc = json.loads((res.out / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    assert group["weights"]["symmetric"] and group["weights"]["strategy"] == "channel"
    acts = group["input_activations"]
    assert acts["num_bits"] == 8 and acts["dynamic"] and acts["strategy"] == "token"
