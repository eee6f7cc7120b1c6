"""The shard planner: contiguous, balanced, and honest about what does not fit."""

import itertools

import pytest

from pipeline.distributed.planner import CUDA_CONTEXT_BYTES, GIB, plan_shards, worker_peaks
from pipeline.errors import VlmqError


def _best_max(layer_bytes, k, first, last):
    """Brute force over all contiguous splits into <= k parts."""
    n = len(layer_bytes)
    best = None
    for parts in range(1, k + 1):
        for cuts in itertools.combinations(range(1, n), parts - 1):
            bounds = (0, *cuts, n)
            sizes = [sum(layer_bytes[a:b]) for a, b in zip(bounds, bounds[1:])]
            sizes[0] += first
            sizes[-1] += last
            m = max(sizes)
            best = m if best is None else min(best, m)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_plan_is_optimal_and_contiguous(seed):
    import random

    rng = random.Random(seed)
    layers = [rng.randint(1, 9) * GIB // 8 for _ in range(9)]
    first, last = rng.randint(0, 5) * GIB // 8, rng.randint(0, 5) * GIB // 8
    plan = plan_shards(layers, 3, 100 * GIB, first_extra=first, last_extra=last)
    flat = [i for a, b in plan.ranges for i in range(a, b)]
    assert flat == list(range(9))
    assert max(plan.shard_bytes) == _best_max(layers, 3, first, last)
    assert sum(plan.shard_bytes) == sum(layers) + first + last


def test_too_big_names_the_fix():
    with pytest.raises(VlmqError) as e:
        plan_shards([10 * GIB] * 8, 2, 24 * GIB)
    assert "does not fit" in e.value.problem and "--gpus" in e.value.fix


def test_worker_peaks_by_hand():
    """Hand-worked: hidden 1000, intermediate 3000, vocab 500, layers of 10 and 12 bytes, head 7 + 3."""
    cfg = {"text_config": {"hidden_size": 1000, "intermediate_size": 3000, "vocab_size": 500}}
    w = worker_peaks(cfg, [10, 12], {"embed": 7, "lm_head": 3}, tokens=100)
    assert w["capture"] == 10 + 12 + 4 * 2048 * 1000 * 2
    assert w["gradient"] == 10 + 12 + 2 * 2048 * 500 * 4  # fp32 logits + their gradient, one sample
    # + six fp32 copies of gate/up (2 x 3000 x 1000) for the alpha grid
    assert w["search"] == 12 + 100 * (3 * 1000 + 3000) * 2 + 6 * 2 * 3000 * 1000 * 4
    # three workers share a GPU: the larger of (2 x capture 16,384,022 (> gradient) + search 145,200,012)
    # and 3 x search 435,600,036
    assert w["per_gpu"] == 435_600_036 + 3 * CUDA_CONTEXT_BYTES
    # two workers: max(capture + search 161,584,034, 2 x search 290,400,024)
    assert w["per_gpu_two"] == 290_400_024 + 2 * CUDA_CONTEXT_BYTES
    big_head = worker_peaks(cfg, [10, 12], {"embed": 400_000_000, "lm_head": 3}, tokens=100)  # capture decides
    assert big_head["per_gpu"] == 2 * (400_000_003 + 12 + 16_384_000) + 145_200_012 + 3 * CUDA_CONTEXT_BYTES


def test_memory_preflight_refuses_only_what_cannot_fit():
    import torch

    from pipeline.distributed.planner import memory_preflight
    from pipeline.models import detect_adapter
    from pipeline.models.loading import estimate_memory
    from pipeline.models.synthetic import synthetic_config

    cfg = synthetic_config("qwen2-vl-mini")
    adapter = detect_adapter(cfg)
    est = estimate_memory(cfg, adapter, torch.bfloat16)
    w = worker_peaks(cfg, est.layer_bytes, est.other_bytes, 1000)
    fixed = max(w["capture"], w["gradient"]) + CUDA_CONTEXT_BYTES
    line, fatal, _ = memory_preflight(cfg, adapter, torch.bfloat16, 1000, fixed - 1)
    assert fatal and "one worker does not fit" in line
    line, fatal, workers = memory_preflight(cfg, adapter, torch.bfloat16, 1000, fixed)  # fits alone only
    assert not fatal and "tight" in line and workers == 2
    line, fatal, workers = memory_preflight(cfg, adapter, torch.bfloat16, 1000, 80 * GIB)
    assert not fatal and "tight" not in line and "GPU 80 GiB" in line and workers == 3
    # between: two workers fit (with the 0.9 margin), three do not -> the two-worker layout, no warning
    gpu = int((w["per_gpu_two"] + w["per_gpu"]) / 2 / 0.9)
    assert w["per_gpu_two"] <= 0.9 * gpu < w["per_gpu"]
    line, fatal, workers = memory_preflight(cfg, adapter, torch.bfloat16, 1000, gpu)
    assert not fatal and workers == 2 and "tight" not in line and "three workers would need" in line


def test_job_check_refuses_a_model_one_worker_cannot_hold(tmp_path, monkeypatch):
    """Before Ray or any data: a GPU too small for one worker is a clear error (and --dry-run says so)."""
    import types

    import torch

    from pipeline.config import spec_from_dict
    from pipeline.distributed.job import check_job
    from pipeline.errors import VlmqError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=64 * 2**20))
    spec = spec_from_dict({"model": "synthetic:qwen2-vl-mini", "out": str(tmp_path / "out"),
                           "recipe": {"method": "mbq", "wbits": 3, "group_size": 32},
                           "resources": {"device": "cuda"}})
    with pytest.raises(VlmqError) as e:
        check_job(spec)
    assert "one worker does not fit" in e.value.problem and "more memory" in e.value.fix
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * GIB))
    assert "per GPU" in check_job(spec).memory_note


def test_plan_says_how_many_workers_share_a_gpu():
    """`vlmq plan` for the 72B shape: three workers on 80 GiB, two on 48 GiB (real-length samples),
    none on 40 GiB at the default 700-token estimate, with what would lower the peak."""
    from pipeline.distributed.planner import format_plan, plan_from_model

    text = {g: format_plan(plan_from_model("synthetic:qwen2-vl-72b", 1, g, tokens=t))
            for g, t in ((80, 128 * 700), (48, 128 * 380), (40, 128 * 700))}
    assert "fits a 80 GiB GPU with three workers" in text[80]
    assert "fits a 48 GiB GPU with two workers (three do not)" in text[48]
    assert "does NOT fit a 40 GiB GPU" in text[40] and "--samples" in text[40]
