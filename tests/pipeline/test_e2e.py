"""A whole quantize job on a local Ray instance, checked against results computed another way."""

import json

import pytest
import torch

from pipeline.checkpoint.loader import iter_quantized
from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.config import spec_from_dict
from pipeline.distributed.job import run_quantize
from pipeline.distributed.progress import JobView
from pipeline.errors import VlmqError
from pipeline.models.weights import open_source
from pipeline.quant.quantizer import QuantScheme, fake_quantize

pytestmark = pytest.mark.slow


def _spec(model, out, **recipe):
    return spec_from_dict({
        "model": str(model), "out": str(out),
        "calib": {"source": "builtin", "num_samples": 4, "holdout": 2},
        "recipe": recipe, "resources": {"device": "cpu"},
    })


@pytest.mark.parametrize("family,recipe", [
    ("llava", dict(method="rtn", wbits=4, group_size=128)),
    ("qwen2_vl", dict(method="rtn", wbits=3, group_size=64)),
    ("internvl", dict(method="rtn", wbits=4, group_size=32, sym=True)),
])
def test_rtn_job_writes_exactly_the_rtn_weights(ray_local, tiny_dirs, tmp_path, family, recipe):
    model = tiny_dirs[family]
    spec = _spec(model, tmp_path / "out", **recipe)
    result = run_quantize(spec, JobView(quiet=True))
    assert result.report["validation"]["ok"]
    assert validate_checkpoint(result.out).ok
    # every decoder Linear on disk dequantizes to RTN of the source weight, computed directly
    source = open_source(model)
    scheme = QuantScheme(recipe["wbits"], recipe["group_size"], recipe.get("sym", False))
    n = 0
    for name, qw, _bias in iter_quantized(result.out):
        w = source.get(f"{name}.weight")
        assert torch.equal(qw.dequantize(torch.float32), fake_quantize(w, scheme, torch.float16).float()), name
        n += 1
    layers = json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert n == 7 * layers
    rep = json.loads((result.out / "report.json").read_text())
    assert rep["fidelity"]["answer"]["tokens"] > 0 and rep["fidelity"]["answer"]["kl"] >= 0
    assert not (tmp_path / "out.work" / "acts").exists()


def test_failed_job_leaves_nothing_validate_accepts(ray_local, tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMQ_FAULT", "search_raise:1")
    spec = _spec(tiny_dirs["llava"], tmp_path / "out", method="rtn")
    with pytest.raises(Exception, match="injected fault"):
        run_quantize(spec, JobView(quiet=True))
    assert not validate_checkpoint(tmp_path / "out").ok


def test_lost_worker_is_retried_and_output_identical(ray_local, tiny_dirs, tmp_path, monkeypatch):
    clean = run_quantize(_spec(tiny_dirs["llava"], tmp_path / "a", method="rtn"), JobView(quiet=True))
    monkeypatch.setenv("VLMQ_FAULT", "search_exit:0")
    crashed = run_quantize(_spec(tiny_dirs["llava"], tmp_path / "b", method="rtn"), JobView(quiet=True))
    assert (tmp_path / "b.work" / ".fault-search_exit-0").exists()  # the fault really fired
    for f in sorted(clean.out.glob("*.safetensors")):
        assert f.read_bytes() == (crashed.out / f.name).read_bytes()


# -- bad input: each a clear error before any model work ------------------------------------


def test_missing_model_path(tmp_path):
    with pytest.raises(VlmqError, match="does not exist"):
        run_quantize(_spec(tmp_path / "nope", tmp_path / "out"), JobView(quiet=True))


def test_unsupported_architecture_lists_supported(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(VlmqError) as e:
        run_quantize(_spec(d, tmp_path / "out"), JobView(quiet=True))
    assert "bert" in e.value.problem and "LlavaForConditionalGeneration" in e.value.fix


def test_group_size_not_dividing_names_the_layer(tiny_dirs, tmp_path):
    import shutil

    d = tmp_path / "odd"
    shutil.copytree(tiny_dirs["llava"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VlmqError) as e:
        run_quantize(_spec(d, tmp_path / "out", group_size=64), JobView(quiet=True))
    assert "mlp.down_proj" in str(e.value)


def test_non_empty_output_needs_overwrite(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(VlmqError, match="not empty"):
        run_quantize(_spec(tiny_dirs["llava"], out), JobView(quiet=True))
    assert (out / "precious.txt").read_text() == "keep me"


def test_corrupt_safetensors_header(tiny_dirs, tmp_path):
    import shutil

    d = tmp_path / "corrupt"
    shutil.copytree(tiny_dirs["llava"], d)
    f = next(d.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    with pytest.raises(VlmqError, match="safetensors"):
        run_quantize(_spec(d, tmp_path / "out"), JobView(quiet=True))


def test_zero_usable_calibration_rows(tiny_dirs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"not an image"] * 3, "prompt": ["q"] * 3, "answer": ["a"] * 3}),
                   tmp_path / "bad.parquet")
    spec = spec_from_dict({"model": str(tiny_dirs["llava"]), "out": str(tmp_path / "out"),
                           "calib": {"source": str(tmp_path / "bad.parquet"), "num_samples": 3, "holdout": 0}})
    with pytest.raises(VlmqError, match="usable"):
        run_quantize(spec, JobView(quiet=True))
    assert not (tmp_path / "out").exists()
