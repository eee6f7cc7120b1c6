"""Suite-wide: GPU tests skip cleanly without CUDA; Triton kernels run in the interpreter
without one; nothing reaches a network."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# TRITON_INTERPRET is read when triton is first imported: set it here, before any test module
# (checkpoint and pipeline tests import the kernels too) can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
