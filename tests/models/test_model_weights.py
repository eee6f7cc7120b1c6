"""open_source / SafetensorsSource: lazy reads, sharded folders, and the errors on bad input."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from model_fixtures import adapter, chat_inputs, tiny, no_grad_one_thread  # noqa: F401 (fixtures)
from safetensors.torch import load_file, save_file

from pipeline.errors import VlmqError
from pipeline.models.loading import build_model
from pipeline.models.weights import PickleSource, SafetensorsSource, open_source, read_safetensors_header


def _copy_non_weights(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix not in (".safetensors",) and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


def test_source_matches_model_without_reading(tiny):
    model, _ = tiny.model("llava")
    src = open_source(tiny.saved("llava"))
    assert isinstance(src, SafetensorsSource) and src.model_dir == tiny.saved("llava")
    assert src.config_dict["model_type"] == "llava"
    sd = model.state_dict()
    assert set(src.keys()) == set(sd)
    for k in src.keys():
        assert src.shape(k) == tuple(sd[k].shape) and src.dtype(k) == sd[k].dtype
        assert src.nbytes(k) == sd[k].numel() * sd[k].element_size()
    k = "model.language_model.layers.1.mlp.down_proj.weight"
    assert src.disk_key(k) == "language_model.model.layers.1.mlp.down_proj.weight"
    assert torch.equal(src.get(k), sd[k])
    pref = src.load_prefix("model.multi_modal_projector.")
    assert set(pref) == {n for n in sd if n.startswith("model.multi_modal_projector.")}
    with pytest.raises(KeyError):
        src.get("model.nothing.weight")


def test_sharded_folder_with_index(tiny, tmp_path):
    model, processor = tiny.model("qwen2_vl")
    d = _copy_non_weights(tiny.saved("qwen2_vl"), tmp_path / "sharded")
    model.save_pretrained(d, max_shard_size="150KB")
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(files) > 2 and (d / "model.safetensors.index.json").is_file()
    src = open_source(d)
    sd = model.state_dict()
    assert set(src.keys()) == set(sd)
    for k in src.keys():
        assert torch.equal(src.get(k), sd[k]), k
    inputs = chat_inputs(processor, seeds=(51,))
    built = build_model(src, adapter("qwen2_vl"))
    torch.testing.assert_close(built(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_hub_layout_checkpoint_loads(tiny, tmp_path):
    """A LLaVA-1.5 Hub layout (CLIP keys under ``vision_tower.vision_model.``) loads to the same model."""
    model, processor = tiny.model("llava")
    d = _copy_non_weights(tiny.saved("llava"), tmp_path / "hub")
    tensors = load_file(tiny.saved("llava") / "model.safetensors")
    hub = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
           for k, v in tensors.items()}
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in hub)
    save_file(hub, d / "model.safetensors")
    built = build_model(open_source(d), adapter("llava"))
    inputs = chat_inputs(processor, seeds=(52,))
    torch.testing.assert_close(built(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_missing_path():
    with pytest.raises(VlmqError, match="does not exist") as e:
        open_source("/nonexistent/vlmq-model")
    assert e.value.fix


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(VlmqError, match="no config.json"):
        open_source(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(VlmqError, match="no \\*.safetensors"):
        open_source(tmp_path)


def _corrupt_cases(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n]
    yield "length", struct.pack("<Q", len(data) * 3) + data[8:]
    yield "json", data[:8] + b"{" + bytes(b ^ 0x5A for b in header[1:]) + data[8 + n:]
    yield "truncated", data[: len(data) - 1000]
    yield "tiny", data[:5]
    # a header whose offsets point past the data
    h = json.loads(header)
    key = next(k for k in h if k != "__metadata__")
    b, e = h[key]["data_offsets"]
    h[key]["data_offsets"] = [b, e + 4]
    raw = json.dumps(h).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    yield "offsets", struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def test_corrupt_header_names_the_file(tiny, tmp_path):
    model, _ = tiny.model("internvl")
    base = _copy_non_weights(tiny.saved("internvl"), tmp_path / "base")
    model.save_pretrained(base, max_shard_size="100KB")
    shards = sorted(base.glob("*.safetensors"))
    victim = shards[len(shards) // 2]
    open_source(base)  # intact: fine
    for case, data in _corrupt_cases(victim.read_bytes()):
        d = tmp_path / case
        shutil.copytree(base, d)
        (d / victim.name).write_bytes(data)
        with pytest.raises(VlmqError) as e:
            open_source(d)
        assert victim.name in str(e.value) and "corrupt" in str(e.value), case
        assert "re-download" in e.value.fix, case
    with pytest.raises(VlmqError, match="corrupt"):
        read_safetensors_header(tmp_path / "json" / victim.name)


def test_index_naming_a_missing_shard(tiny, tmp_path):
    model, _ = tiny.model("llava")
    d = _copy_non_weights(tiny.saved("llava"), tmp_path / "m")
    model.save_pretrained(d, max_shard_size="300KB")
    shards = sorted(d.glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(VlmqError, match=shards[-1].name):
        open_source(d)


def test_index_disagreeing_with_shards(tiny, tmp_path):
    model, _ = tiny.model("llava")
    d = _copy_non_weights(tiny.saved("llava"), tmp_path / "m")
    model.save_pretrained(d, max_shard_size="300KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    files = sorted(set(wm.values()))
    src = next(f for f in files if list(wm.values()).count(f) > 1)
    dst = next(f for f in files if f != src)
    key = next(k for k, v in wm.items() if v == src)
    wm[key] = dst  # claims the tensor lives in another shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(VlmqError, match=dst) as e:
        open_source(d)
    assert key in str(e.value)


def test_pickles_refused_unless_allowed(tiny, tmp_path):
    model, processor = tiny.model("llava")
    d = _copy_non_weights(tiny.saved("llava"), tmp_path / "pickled")
    disk = load_file(tiny.saved("llava") / "model.safetensors")  # legacy on-disk keys
    torch.save(disk, d / "pytorch_model.bin")
    with pytest.raises(VlmqError) as e:
        open_source(d)
    assert "pickle" in str(e.value) and "pytorch_model.bin" in str(e.value)
    assert "--allow-pickle" in e.value.fix
    src = open_source(d, allow_pickle=True)
    assert isinstance(src, PickleSource)
    assert set(src.keys()) == set(model.state_dict())
    built = build_model(src, adapter("llava"))
    inputs = chat_inputs(processor, seeds=(53,))
    torch.testing.assert_close(built(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_two_layouts_in_one_folder_is_an_error(tiny, tmp_path):
    d = _copy_non_weights(tiny.saved("llava"), tmp_path / "mixed")
    tensors = load_file(tiny.saved("llava") / "model.safetensors")
    save_file(tensors, d / "a.safetensors")
    k = "language_model.model.norm.weight"
    save_file({"model.language_model.norm.weight": torch.randn_like(tensors[k])}, d / "b.safetensors")
    with pytest.raises(VlmqError, match="model.language_model.norm.weight"):
        open_source(d)
