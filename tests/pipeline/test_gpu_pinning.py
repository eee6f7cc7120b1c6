"""Reused Ray workers must compute on the GPU Ray assigned to each task, not the first one they saw.

A CUDA runtime reads CUDA_VISIBLE_DEVICES once, while Ray rewrites it per task; with workers kept
alive across tasks (``max_calls=0``) a worker handed GPU 1 after GPU 0 kept using GPU 0. The Ray
part runs against a local Ray that declares two (fake) GPUs, so CI checks it without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.distributed.context import cuda_index, open_cuda_view

ROOT = Path(__file__).resolve().parents[2]


def test_cuda_index_by_hand():
    assert cuda_index("1", None) == 1  # whole node visible: Ray's id is the CUDA index
    assert cuda_index("7", ["5", "7"]) == 1  # a node started with CUDA_VISIBLE_DEVICES=5,7
    assert cuda_index("GPU-ab", ["GPU-cd", "GPU-ab"]) == 1
    with pytest.raises(RuntimeError, match="cannot see"):
        cuda_index("3", ["5", "7"])


def test_open_cuda_view_widens_what_ray_narrowed():
    env = {"CUDA_VISIBLE_DEVICES": "1", "OTHER": "x"}  # what Ray sets for a task on GPU 1
    assert open_cuda_view(None, env) is None and env == {"OTHER": "x"}
    env = {"CUDA_VISIBLE_DEVICES": "7"}
    assert open_cuda_view(["5", "7"], env) == ["5", "7"] and env == {"CUDA_VISIBLE_DEVICES": "5,7"}


_SCRIPT = r"""
import json, os, sys, time
import ray
from pipeline.distributed import context

@ray.remote(num_gpus=0.5, max_calls=0)
def probe(k):
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")   # what Ray set for this task
    first = context._cuda_view is context._UNSET
    assignment = context.ray_gpu_assignment()
    import torch
    torch.cuda.is_available = lambda: False          # the GPUs are Ray's fakes, even on a GPU machine
    context.worker_device()                          # opens the view on a process's first call
    ids, original = assignment
    time.sleep(0.2)                                  # keep two tasks per GPU in flight
    return {"pid": os.getpid(), "ids": ids, "original": original, "ray_env": seen, "first": first,
            "view": context._cuda_view, "env_after": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "index": context.cuda_index(ids[0], context._cuda_view)}

from pipeline.distributed.scheduler import GPU_LAYOUTS
CAPTURE_SHARE, SEARCH_SHARE = GPU_LAYOUTS[3].capture_share, GPU_LAYOUTS[3].search_share

@ray.remote
def slot(share):
    time.sleep(1.0)
    return ray.get_runtime_context().get_accelerator_ids()["GPU"][0], share

out = []
for visible in (None, "5,7"):
    if visible is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out.append(ray.get([probe.remote(k) for k in range(12)]))
    if visible is None:  # a 2-GPU job's four capture groups and two warm-up searches, submitted together
        refs = [slot.options(num_gpus=CAPTURE_SHARE).remote("capture") for _ in range(4)]
        refs += [slot.options(num_gpus=SEARCH_SHARE).remote("search") for _ in range(2)]
        out.append(ray.get(refs))
    ray.shutdown()
print("RESULT" + json.dumps(out))
"""


def test_reused_workers_follow_each_tasks_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
    plain, slots, narrowed = json.loads(line[len("RESULT"):])

    # Ray packs fractional GPUs: with 0.5 / 0.5 (one group per GPU) both capture groups landed on GPU 0
    capture_gpus = [g for g, what in slots if what == "capture"]
    search_gpus = [g for g, what in slots if what == "search"]
    assert sorted(capture_gpus) == ["0", "0", "1", "1"] and sorted(search_gpus) == ["0", "1"]

    # a node with every GPU visible: Ray numbers them 0, 1 and so does the opened view
    assert {r["ids"][0] for r in plain} == {"0", "1"}
    for r in plain:
        assert r["original"] is None and r["view"] is None and r["index"] == int(r["ids"][0])
        if r["first"]:
            assert r["ray_env"] == r["ids"][0] and r["env_after"] is None  # Ray's one GPU, widened
    # workers were reused across tasks (that is what made the first GPU stick)
    assert len({r["pid"] for r in plain}) < len(plain)

    # a node started with CUDA_VISIBLE_DEVICES=5,7: Ray hands out "5" / "7", index is the position
    assert {r["ids"][0] for r in narrowed} == {"5", "7"}
    for r in narrowed:
        assert r["original"] == ["5", "7"] and r["index"] == ["5", "7"].index(r["ids"][0])
        if r["first"]:
            assert r["env_after"] == "5,7"


@pytest.mark.parametrize("env, enabled_after", [(None, False), ("1", True), ("0", False)])
def test_workers_keep_attention_off_cudnn(monkeypatch, env, enabled_after):
    """cuDNN SDPA plans a kernel per sequence length (35 ms a new length on the H100): every
    worker entry point turns it off unless VLMQ_CUDNN_SDPA=1."""
    import torch

    from pipeline.distributed.context import worker_device
    from pipeline.evaluate.tasks.items import worker_device as eval_worker_device
    from pipeline.models.loading import CUDNN_SDPA_ENV

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for entry in (worker_device, eval_worker_device):
            torch.backends.cuda.enable_cudnn_sdp(True)
            if env is None:
                monkeypatch.delenv(CUDNN_SDPA_ENV, raising=False)
            else:
                monkeypatch.setenv(CUDNN_SDPA_ENV, env)
            entry()
            assert torch.backends.cuda.cudnn_sdp_enabled() is enabled_after
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
