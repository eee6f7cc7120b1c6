"""The kernel autotuner's decisions kept between processes (pipeline.kernel_choices)."""

import json

import pytest
import torch

from kernels import autotune
from pipeline import kernel_choices


def test_cache_file_names_gpu_triton_and_source(monkeypatch, tmp_path):
    """CPU or VLMQ_KERNEL_CACHE=0: no file. On a GPU the name carries the GPU, the triton version and a
    hash of kernels/*.py, so a changed kernel or candidate list starts a fresh file."""
    assert kernel_choices.cache_file("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("VLMQ_KERNEL_CACHE", str(tmp_path))
    p = kernel_choices.cache_file("cuda:0")
    assert p.parent == tmp_path and p.name.startswith("NVIDIA-H100-80GB-HBM3-triton") and p.suffix == ".json"
    monkeypatch.setattr(kernel_choices, "_source_hash", lambda: "another")
    assert kernel_choices.cache_file("cuda:0") != p
    monkeypatch.delenv("VLMQ_KERNEL_CACHE")
    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path / "c"))
    assert kernel_choices.cache_file("cuda:0").parent == tmp_path / "c" / "kernels"
    monkeypatch.setenv("VLMQ_KERNEL_CACHE", "0")
    assert kernel_choices.cache_file("cuda:0") is None


def test_save_merges_and_load_preloads(monkeypatch, tmp_path):
    """save() keeps what another process wrote and adds this one's; load() hands the file to the
    autotuner, whose next pick of such a key times nothing; a corrupt file is treated as empty."""
    path = tmp_path / "gpu.json"
    monkeypatch.setattr(kernel_choices, "cache_file", lambda d: path)
    key = ("test-kc", torch.float16, 7)
    path.write_text(json.dumps({'["other"]': "x"}))
    monkeypatch.setattr(autotune, "_NAME", {key: "fast"})
    assert kernel_choices.save("cuda") == path
    assert json.loads(path.read_text()) == {'["other"]': "x", autotune.key_string(key): "fast"}

    monkeypatch.setattr(autotune, "_PRELOAD", {})
    assert kernel_choices.load("cuda") == 2
    timed = []
    cands = [("slow", lambda a: "s"), ("fast", lambda a: "f")]
    fn = autotune.pick(key, cands, (0,), timer=lambda cs, a: timed.append(cs) or [("slow", 0.1)])
    assert fn(0) == "f" and timed == []

    path.write_text("{not json")
    assert kernel_choices.load("cuda") == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_second_process_reuses_the_launch_without_timing(monkeypatch, tmp_path):
    """On the GPU: tune a shape, save; a 'new process' (the autotuner's state cleared) loads the file
    and runs the same launch without timing anything, giving the same output."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "kernels"))
    from kt_helpers import random_qweight, random_x

    from kernels.dispatch import matmul
    from kernels.layout import pack

    monkeypatch.setenv("VLMQ_KERNEL_CACHE", str(tmp_path))
    for name in ("_BEST", "_NAME", "_TRACE", "_PRELOAD"):
        monkeypatch.setattr(autotune, name, {})
    gen = torch.Generator().manual_seed(0)
    pw = pack(random_qweight(1000, 2048, 4, 128, False, torch.float16, gen), device="cuda")
    x = random_x(1, 2048, torch.float16, gen, "cuda")
    y = matmul(x, pw)
    first = autotune.last()
    path = kernel_choices.save("cuda")
    assert path is not None and first in json.loads(path.read_text()).values()

    for name in ("_BEST", "_NAME", "_TRACE", "_PRELOAD"):
        monkeypatch.setattr(autotune, name, {})
    assert kernel_choices.load("cuda") == 1
    y2 = matmul(x, pw)
    assert autotune.last() == first and autotune.trace() == {}  # nothing was timed
    # the same launch; split-K atomics may add in another order
    assert torch.allclose(y2.float(), y.float(), rtol=2e-3, atol=2e-3 * float(y.abs().max()))
