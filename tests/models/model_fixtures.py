"""Fixtures for the model tests: tiny models of every family, built and saved once per process.

Not a conftest.py on purpose: several test folders do ``from conftest import ...``, which resolves
to whichever conftest was imported last; test modules here import these names explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.models import ADAPTERS
from pipeline.models.tiny import TINY_FAMILIES, build_tiny_model, save_tiny, tiny_image

FAMILIES = TINY_FAMILIES


class Tiny:
    """Lazily built tiny models (in memory) and saved folders, shared by the whole session."""

    def __init__(self, root: Path):
        self.root = root
        self._models: dict[str, Any] = {}
        self._dirs: dict[str, Path] = {}

    def model(self, family: str):
        if family not in self._models:
            self._models[family] = build_tiny_model(family, seed=0)
        return self._models[family]

    def saved(self, family: str) -> Path:
        """A folder written by ``save_tiny`` with the same seed as ``model``."""
        if family not in self._dirs:
            self._dirs[family] = save_tiny(family, self.root / family, seed=0)
        return self._dirs[family]


_TINY: list[Tiny] = []


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    # one instance for the process, although each module imports this fixture
    if not _TINY:
        _TINY.append(Tiny(tmp_path_factory.mktemp("tiny-models")))
    return _TINY[0]


def chat_inputs(processor, seeds=(0,), sizes=((40, 52),), question: str = "What colour is the circle?"):
    """Processor + chat template inputs for one prompt per image (batch = len(seeds))."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    images = [tiny_image(s, size=sz) for s, sz in zip(seeds, sizes)]
    return dict(processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt"))


def adapter(family: str):
    return ADAPTERS[family]


@pytest.fixture(autouse=True)
def no_grad_one_thread():
    """Tiny models run 10-100x faster on one thread when the 2 cores are shared (OpenMP workers
    spin against other processes); restore the setting for the rest of the session."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(prev)
