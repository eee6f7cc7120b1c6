"""What every evaluation task is: a small picklable description that runs one shard of examples.

A task is created on the driver from the user's ``--tasks`` string (cheap: files are checked and
rows counted, nothing is decoded), travels to a fleet worker inside a work item, and there runs
``run(ctx, start, stop)`` on examples ``start..stop-1`` with the checkpoint the worker has loaded.
It returns one JSON-able record per example; ``aggregate`` turns the records of every shard into
the task's metrics. Metrics therefore never depend on how examples were sharded or on which
worker ran a shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class RunContext:
    """What a worker hands a task: the loaded checkpoint and a per-worker scratch cache."""

    model: torch.nn.Module
    processor: Any
    ckpt: Any  # checkpoints.CheckpointRef
    device: torch.device
    dtype: torch.dtype
    cache: dict[str, Any] = field(default_factory=dict)  # task data kept between shards
    reference: Callable[[], tuple[torch.nn.Module, Any]] | None = None  # the fp model, loaded on demand


@dataclass(frozen=True)
class Task:
    """Base class. ``name`` is what results and reports show; ``key`` identifies the work (with
    absolute paths and every parameter) for resume."""

    kind: str
    name: str
    source: str | None = None
    limit: int | None = None
    seed: int = 0
    shard_size: int = 64
    num_examples: int = 0

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.source}|n={self.num_examples}|seed={self.seed}"

    @property
    def needs_reference(self) -> bool:
        return False

    def size(self) -> int:
        return self.num_examples

    def run(self, ctx: RunContext, start: int, stop: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def headline(self, metrics: dict[str, Any]) -> tuple[str, float | None]:
        """(metric name, value) for the summary table; higher is better unless the name says ppl/kl."""
        if "accuracy" in metrics:
            return "accuracy", metrics["accuracy"]
        return "", None


def seeded(seed: int) -> None:
    """Greedy decoding needs no randomness, but anything that samples must be reproducible."""
    torch.manual_seed(seed)
