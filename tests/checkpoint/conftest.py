"""Fixtures for the checkpoint tests: a tiny LLaVA on disk, its WeightSource, RTN results, inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import write_checkpoint
from pipeline.checkpoint.reference import write_reference
from pipeline.models import detect_adapter
from pipeline.models.loading import build_model, layer_linear_names
from pipeline.models.tiny import build_processor, save_tiny, tiny_image
from pipeline.models.weights import open_source
from pipeline.quant.quantizer import QuantizedWeight, QuantScheme, quantize_weight

from ckpt_helpers import SCHEMES, fake_quant_model, logits_of, reference_hook, rtn  # noqa: E402

@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny models run much faster on one thread when the 2 cores are shared (OpenMP workers spin
    against other processes). Package scope: restored after the last checkpoint test."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA saved with save_pretrained (legacy on-disk keys) plus processor files."""
    return save_tiny("llava", tmp_path_factory.mktemp("tiny") / "llava", seed=1)


@pytest.fixture(scope="session")
def source(tiny_dir):
    return open_source(tiny_dir)


@pytest.fixture(scope="session")
def adapter(source):
    return detect_adapter(source.config_dict)


@pytest.fixture(scope="session")
def quantized(source, adapter):
    """{scheme name: {module: QuantizedWeight}} for the three schemes under test."""
    return {name: rtn(source, adapter, s, seed=i) for i, (name, s) in enumerate(SCHEMES.items())}


@pytest.fixture(scope="session")
def sample_inputs(tiny_dir) -> list[dict[str, torch.Tensor]]:
    """Two processed (image, prompt) samples of the tiny LLaVA."""
    proc = build_processor("llava")
    out = []
    for i, text in enumerate(["USER: <image>\nWhat colour is the star? ASSISTANT:", "USER: <image>\nDescribe the image. ASSISTANT:"]):
        enc = proc(images=tiny_image(seed=10 + i), text=text, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.fixture(scope="session")
def ref_logits(source, adapter, quantized, sample_inputs):
    """{scheme name: logits of the in-memory fake-quant model on sample_inputs}."""
    return {name: logits_of(fake_quant_model(source, adapter, qws), sample_inputs) for name, qws in quantized.items()}


@pytest.fixture(scope="session")
def written(tmp_path_factory, source, quantized, sample_inputs, ref_logits):
    """{scheme name: checkpoint dir} with validation references, small shards to force sharding."""
    base = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, qws in quantized.items():
        ref = ref_logits[name]
        out[name] = write_checkpoint(
            base / name, source, qws, recipe_info={"method": "rtn", "scheme": name},
            stage_hook=reference_hook(sample_inputs, ref), max_shard_bytes=300_000,
        )  # fmt: skip
    return out
