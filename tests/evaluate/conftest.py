"""Fixtures for the evaluation tests: one Ray instance, a tiny LLaVA with RTN checkpoints, local task files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from eval_helpers import make_mc_file, make_vqa_file, write_rtn_checkpoint  # noqa: E402


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread when the 2 cores are shared."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (reused when another suite started one)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from pipeline.models.tiny import save_tiny

    return save_tiny("llava", tmp_path_factory.mktemp("evtiny") / "tiny-llava", seed=3)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tiny_llava) -> dict[str, Path]:
    """fp folder, RTN W4 g32 and RTN W2 g32 checkpoints, a byte-identical copy of W4, and a corrupt W4."""
    base = tmp_path_factory.mktemp("evckpts")
    out = {"fp": tiny_llava,
           "w4": write_rtn_checkpoint(tiny_llava, base / "rtn-w4", bits=4),
           "w2": write_rtn_checkpoint(tiny_llava, base / "rtn-w2", bits=2)}
    out["w4copy"] = Path(shutil.copytree(out["w4"], base / "copy" / "rtn-w4-copy"))
    bad = Path(shutil.copytree(out["w4"], base / "broken" / "rtn-w4-broken"))
    shard = next(bad.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated, as by a failed copy
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"][shard.name]["size"] = shard.stat().st_size  # so the size check passes: the load must fail
    (bad / "manifest.json").write_text(json.dumps(manifest))
    out["broken"] = bad
    return out


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evdata")
    return {"vqa": make_vqa_file(d / "vqa.jsonl", 6), "mc": make_mc_file(d / "mc.jsonl", 5),
            "calib": make_vqa_file(d / "calib.jsonl", 6)}
