"""Resume: a killed driver's job continues without redoing finished blocks, and ends in the same
checkpoint, byte for byte; a changed job is refused before any work."""

import os
import subprocess
import sys

import pytest

from pipeline.config import spec_from_dict
from pipeline.distributed.job import run_quantize
from pipeline.distributed.progress import JobView
from pipeline.errors import VlmqError

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(model, out, *extra):
    return ["--model", str(model), "--calib", "builtin", "--num-samples", "4", "--holdout", "2",
            "--out", str(out), "--device", "cpu", "--method", "awq", "--wbits", "3", "--group-size", "64",
            "--num-cpus", "2", *extra]


def _spec(model, out, **kw):
    recipe = {"method": "awq", "wbits": 3, "group_size": 64, **kw.pop("recipe", {})}
    return spec_from_dict({"model": str(model), "out": str(out), "calib": {"source": "builtin", "num_samples": 4,
                           "holdout": 2}, "recipe": recipe, "resources": {"device": "cpu"}, **kw})


@pytest.fixture(scope="module")
def killed_job(tiny_dirs, tmp_path_factory):
    """A job whose driver died (exit 17) after two of four blocks were searched."""
    out = tmp_path_factory.mktemp("resume") / "out"
    env = {**os.environ, "VLMQ_FAULT": "driver_exit:2", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "quantize", *_args(tiny_dirs["qwen2_vl"], out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 17, proc.stderr[-3000:]
    parts = sorted((out.parent / "out.work" / "parts").glob("block_*.safetensors"))
    assert len(parts) >= 2 and not out.exists()
    return out, {p.name: p.stat().st_mtime_ns for p in parts}


def test_changed_recipe_is_refused(killed_job, tiny_dirs):
    out, _ = killed_job
    with pytest.raises(VlmqError) as e:
        run_quantize(_spec(tiny_dirs["qwen2_vl"], out, resume=True, recipe={"wbits": 4}), JobView(quiet=True))
    assert "wbits 3 -> 4" in e.value.problem and "--overwrite" in e.value.fix


def test_rerun_without_resume_is_refused(killed_job, tiny_dirs):
    out, _ = killed_job
    with pytest.raises(VlmqError, match="--resume"):
        run_quantize(_spec(tiny_dirs["qwen2_vl"], out), JobView(quiet=True))


def test_resume_finishes_without_redoing_blocks(ray_local, killed_job, tiny_dirs, tmp_path):
    out, before = killed_job
    resumed = run_quantize(_spec(tiny_dirs["qwen2_vl"], out, resume=True), JobView(quiet=True))
    assert resumed.report["validation"]["ok"]
    assert resumed.report["resumed_blocks"] == sorted(int(n[6:10]) for n in before)
    parts = out.parent / "out.work" / "parts"
    for name, mtime in before.items():
        assert (parts / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    clean = run_quantize(_spec(tiny_dirs["qwen2_vl"], tmp_path / "clean"), JobView(quiet=True))
    shards = sorted(p.name for p in clean.out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in resumed.out.glob("*.safetensors"))
    for name in shards:
        assert (clean.out / name).read_bytes() == (resumed.out / name).read_bytes(), name
