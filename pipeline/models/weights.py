"""Lazy access to a model's weights, one tensor at a time: the driver never holds a whole model.

``WeightSource`` is the seam between where weights come from (a safetensors folder, or — for
scale tests — deterministic synthetic tensors generated where they are needed) and everything
that reads them (layer builders, search actors, the checkpoint writer). All names are *module
names* of the transformers 5 class (``model.language_model.layers.0.self_attn.q_proj.weight``),
whatever layout the files on disk use.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class WeightSource(abc.ABC):
    """Read-only, lazily materialized weights of one model."""

    #: folder with config.json and processor/tokenizer files to copy into an output checkpoint,
    #: or None when there is none (synthetic models).
    model_dir: Path | None = None

    @property
    @abc.abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The parsed config.json."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every tensor name (module-name convention), in a stable order."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def dtype(self, name: str) -> torch.dtype: ...

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One tensor, materialized on CPU (memory-mapped where the backend allows)."""

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with ``prefix``, keyed by the full name."""
        return {k: self.get(k) for k in self.keys() if k.startswith(prefix)}

    def nbytes(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n * torch.empty((), dtype=self.dtype(name)).element_size()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)
