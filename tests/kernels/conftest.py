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


@pytest.fixture(autouse=True)
def workspace_left_clean():
    """Every split-K launch must leave the shared partial sums and tile counters zeroed: a counter
    left at 1 makes the next kernel using that tile finish early (partial sums) or never (an
    unwritten output), so a miscounted ``expected`` anywhere corrupts a later, innocent layer."""
    yield
    from kernels import dispatch

    for pool, nz_c, nz_w in dispatch.dirty_workspaces(reset=True):
        pytest.fail(f"{pool} workspace left dirty: {nz_c} counters, {nz_w} partial sums nonzero")
