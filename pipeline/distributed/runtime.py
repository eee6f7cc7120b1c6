"""Connecting to Ray: a cluster when given an address (flag or RAY_ADDRESS), else a local instance."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..config import Resources


@dataclass(frozen=True)
class RayContext:
    address: str | None  # None: we started a local instance
    num_cpus: int
    num_gpus: int
    started_here: bool


def init_ray(res: Resources) -> RayContext:
    """Start or join Ray. Idempotent within one process."""
    import ray

    address = res.address or os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        started = True
        kwargs: dict = dict(ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=True)
        if address:
            ray.init(address=address, **kwargs)
        else:
            # A local instance: no dashboard (faster start), workers inherit this environment.
            ray.init(num_cpus=res.num_cpus, num_gpus=res.num_gpus, include_dashboard=False, **kwargs)
    total = ray.cluster_resources()
    num_gpus = int(total.get("GPU", 0)) if res.num_gpus is None else min(res.num_gpus, int(total.get("GPU", 0)))
    num_cpus = int(total.get("CPU", 1))
    return RayContext(address=address, num_cpus=num_cpus, num_gpus=num_gpus, started_here=started)


def shutdown_ray(ctx: RayContext | None) -> None:
    import ray

    if ctx is not None and ctx.started_here and ray.is_initialized():
        ray.shutdown()
