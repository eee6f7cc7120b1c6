"""Synthetic weights: real shapes, deterministic values, identical on CPU and GPU."""

import pytest
import torch

from pipeline.distributed.planner import GIB, plan_from_model
from pipeline.models.synthetic import (SyntheticWeightSource, hash_uniform, materialize_synthetic,
                                       synthetic_names, synthetic_tensor, tensor_seed)


def test_hash_uniform_statistics_and_chunk_independence():
    u = hash_uniform(300_007, seed=7, chunk=1 << 16)
    v = hash_uniform(300_007, seed=7, chunk=1 << 24)
    assert torch.equal(u, v)  # a pure function of the index, not of the chunking
    assert u.min() >= -1 and u.max() < 1
    assert abs(u.mean().item()) < 0.005
    assert abs(u.std().item() - 3 ** -0.5) < 0.003
    # neighbouring indices are not correlated
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01
    assert not torch.equal(u, hash_uniform(300_007, seed=8))


def test_tensor_scale_follows_fan_in():
    w = synthetic_tensor("m", "x.q_proj.weight", (64, 4096), torch.float32)
    assert abs(w.std().item() - 4096 ** -0.5) / 4096 ** -0.5 < 0.02
    n = synthetic_tensor("m", "x.input_layernorm.weight", (4096,), torch.float32)
    assert (n - 1).abs().max() <= 0.05


def test_chunked_bf16_generation_equals_the_whole_tensor_in_fp32_then_cast():
    """Generation applies the scale and the cast chunk by chunk (no fp32 copy of a whole bf16
    tensor); the values must be those of scaling the whole fp32 tensor and casting once."""
    import math

    shape = (300, 1001)  # 300,300 elements over 5 chunks of 2^16: chunk edges inside rows
    seed = tensor_seed("m", "x.up_proj.weight")
    want = (hash_uniform(300 * 1001, seed) * math.sqrt(3.0 / 1001)).to(torch.bfloat16).reshape(shape)
    got = hash_uniform(300 * 1001, seed, chunk=1 << 16, transform=lambda u: u * math.sqrt(3.0 / 1001),
                       dtype=torch.bfloat16).reshape(shape)
    assert torch.equal(got, want)
    assert torch.equal(synthetic_tensor("m", "x.up_proj.weight", shape, torch.bfloat16), want)
    norm = synthetic_tensor("m", "x.input_layernorm.weight", (777,), torch.bfloat16)
    assert torch.equal(norm, (1.0 + 0.05 * hash_uniform(777, tensor_seed("m", "x.input_layernorm.weight"))).to(torch.bfloat16))


@pytest.mark.parametrize("name,params_b", [("qwen2-vl-7b", 8.29), ("qwen2-vl-72b", 73.4)])
def test_real_parameter_counts(tmp_path, name, params_b):
    src = SyntheticWeightSource(materialize_synthetic(name, tmp_path / name))
    n = sum(torch.Size(src.shape(k)).numel() for k in src.keys())
    assert abs(n / 1e9 - params_b) / params_b < 0.02, n
    assert src.get("model.language_model.layers.0.input_layernorm.weight").dtype == torch.bfloat16


def test_every_synthetic_model_plans(tmp_path):
    for name in synthetic_names():
        plan = plan_from_model(f"synthetic:{name}", n_gpus=4, gpu_mem_gib=80)
        assert len(plan.ranges) == min(4, len(plan.layer_bytes)) and max(plan.peak_bytes) < 80 * GIB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_generate_identical_tensors():
    a = synthetic_tensor("qwen2-vl-7b", "layers.3.mlp.up_proj.weight", (1024, 3584), torch.bfloat16, "cpu")
    b = synthetic_tensor("qwen2-vl-7b", "layers.3.mlp.up_proj.weight", (1024, 3584), torch.bfloat16, "cuda")
    assert torch.equal(a, b.cpu())


@pytest.mark.slow
def test_synthetic_job_end_to_end(ray_local, tmp_path, monkeypatch):
    """`--model synthetic:NAME` through the whole job: 256 vision tokens per image like the real
    model, weights generated where needed, a checkpoint that validates."""
    from pipeline.config import spec_from_dict
    from pipeline.distributed.job import run_quantize
    from pipeline.distributed.progress import JobView

    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path / "cache"))
    spec = spec_from_dict({"model": "synthetic:qwen2-vl-mini", "out": str(tmp_path / "out"),
                           "calib": {"source": "builtin", "num_samples": 2, "holdout": 1},
                           "recipe": {"method": "mbq", "wbits": 3, "group_size": 128}, "resources": {"device": "cpu"}})
    res = run_quantize(spec, JobView(quiet=True))
    assert res.report["validation"]["ok"]
    assert res.report["data"]["vision_tokens"] == 256 * 3  # 448x448 -> 32x32 patches -> 2x2 merge
    assert len(res.report["sensitivity"]["ratios"]) == 3
