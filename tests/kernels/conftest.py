"""Run the Triton kernels in the interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, unseeded generator: every run draws new inputs (the seed is printed on failure)."""
    g = torch.Generator()
    seed = int.from_bytes(os.urandom(4), "little")
    g.manual_seed(seed)
    print(f"seed={seed}")
    return g
