"""The writer never leaves something validate accepts after a failure, and never loses user data."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.checkpoint import validate_checkpoint, write_checkpoint
from pipeline.checkpoint.writer import check_output_dir
from pipeline.errors import VlmqError
from pipeline.models.weights import WeightSource


class SpySource(WeightSource):
    """Delegates to a real source; counts reads and can fail on the n-th one."""

    def __init__(self, inner: WeightSource, fail_at: int | None = None):
        self.inner, self.fail_at, self.reads = inner, fail_at, 0
        self.model_dir = inner.model_dir

    @property
    def config_dict(self):
        return self.inner.config_dict

    def keys(self):
        return self.inner.keys()

    def shape(self, name):
        return self.inner.shape(name)

    def dtype(self, name):
        return self.inner.dtype(name)

    def get(self, name):
        self.reads += 1
        if self.fail_at is not None and self.reads >= self.fail_at:
            raise OSError(f"read error on {name}")
        return self.inner.get(name)


def _siblings(parent):
    return sorted(p.name for p in parent.iterdir())


def test_writer_that_raises_midway_leaves_nothing(tmp_path, source, quantized):
    spy = SpySource(source, fail_at=40)
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="read error"):
        write_checkpoint(out, spy, quantized["w4g32sym"], max_shard_bytes=100_000)
    assert spy.reads == 40  # it did fail midway, after writing some shards
    assert not out.exists() and _siblings(tmp_path) == []  # staging directory removed too
    assert not validate_checkpoint(out).ok


def test_killed_before_the_manifest_leaves_nothing_valid(tmp_path, source, quantized):
    """A hard kill cannot run cleanup: snapshot the staging directory at the last moment before the
    manifest (everything else is written) and check that validate rejects it."""
    snap = tmp_path / "snapshot"
    out = tmp_path / "ckpt"
    write_checkpoint(out, source, quantized["w4g32sym"], stage_hook=lambda d: shutil.copytree(d, snap))
    assert (snap / "config.json").is_file() and not (snap / "manifest.json").exists()
    r = validate_checkpoint(snap)
    assert not r.ok and "incomplete" in r.check("integrity").message
    assert validate_checkpoint(out).ok  # the same run, finished, is accepted


def test_non_empty_dir_without_overwrite_is_refused_before_any_work(tmp_path, source, quantized):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    spy = SpySource(source)
    with pytest.raises(VlmqError, match="not empty") as e:
        write_checkpoint(out, spy, quantized["w4g32sym"])
    assert "--overwrite" in e.value.fix
    assert spy.reads == 0 and _siblings(tmp_path) == ["ckpt"] and _siblings(out) == ["notes.txt"]
    with pytest.raises(VlmqError, match="not empty"):
        check_output_dir(out)  # the CLI's early check, before any model work


def test_overwrite_replaces_only_the_target(tmp_path, source, quantized):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (tmp_path / "neighbour.txt").write_text("keep")
    write_checkpoint(out, source, quantized["w4g32sym"], overwrite=True)
    assert not (out / "old.txt").exists() and validate_checkpoint(out).ok
    assert _siblings(tmp_path) == ["ckpt", "neighbour.txt"]


def test_empty_existing_dir_is_fine(tmp_path, source, quantized):
    out = tmp_path / "ckpt"
    out.mkdir()
    write_checkpoint(out, source, quantized["w4g32sym"])
    assert validate_checkpoint(out).check("integrity").status == "pass"


def test_overwrite_never_deletes_the_source_model(tmp_path, source, quantized, tiny_dir):
    before = _siblings(tiny_dir)
    for target in (tiny_dir, tiny_dir.parent):
        with pytest.raises(VlmqError, match="refusing to overwrite"):
            write_checkpoint(target, source, quantized["w4g32sym"], overwrite=True)
    assert _siblings(tiny_dir) == before


def test_inconsistent_inputs_are_refused_before_writing(tmp_path, source, quantized):
    qws = dict(quantized["w4g32sym"])
    out = tmp_path / "ckpt"
    name = next(iter(qws))
    cases = [
        ({**qws, "model.language_model.layers.9.mlp.up_proj": qws[name]}, {}, "no model.language_model.layers.9"),
        (qws, {"model.language_model.norm.weight": torch.randn(7)}, "shape"),
        (qws, {"model.language_model.nope.weight": torch.randn(7)}, "not in the source"),
        (qws, {f"{name}.weight": torch.randn(source.shape(f"{name}.weight"))}, "both replaced and quantized"),
    ]
    for q, rep, msg in cases:
        with pytest.raises(VlmqError, match=msg):
            write_checkpoint(out, source, q, replaced=rep)
        assert _siblings(tmp_path) == []
    with pytest.raises(VlmqError, match="both ignored and quantized"):
        write_checkpoint(out, source, qws, ignore=[name, "lm_head"])


def test_extra_files_are_written_and_hashed(tmp_path, source, quantized):
    extra = tmp_path / "report.md"
    extra.write_text("# report\n")
    out = write_checkpoint(
        tmp_path / "ckpt", source, quantized["w4g32sym"], extra_files={"report.md": extra, "eval/scores.json": b"{}"}
    )
    assert (out / "report.md").read_text() == "# report\n" and (out / "eval/scores.json").read_bytes() == b"{}"
    assert validate_checkpoint(out).check("integrity").numbers["unlisted"] == []
    for bad in ("../escape.txt", "/abs.txt", "config.json"):
        with pytest.raises(VlmqError):
            write_checkpoint(tmp_path / "ckpt2", source, quantized["w4g32sym"], extra_files={bad: b"x"})


def test_dtype_casts_unquantized_tensors_only(tmp_path, source, quantized):
    import json

    from safetensors.torch import load_file

    qws = quantized["w4g32sym"]
    out = write_checkpoint(tmp_path / "bf16", source, qws, dtype=torch.bfloat16)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    for k, t in tensors.items():
        if k.endswith(("weight_packed", "weight_shape")):
            continue
        if k.endswith("weight_scale"):
            assert t.dtype == torch.float16  # the QuantizedWeight's own scale dtype
        elif t.is_floating_point():
            assert t.dtype == torch.bfloat16 and torch.equal(t, source.get(k).to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert validate_checkpoint(out).check("layout").status == "pass"
