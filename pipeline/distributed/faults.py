"""Fault injection for tests of the pipeline's failure handling (never set in normal use).

``VLMQ_FAULT`` on the driver, e.g. ``search_raise:1`` (block 1's search raises every time),
``search_exit:1`` (the worker searching block 1 dies once, as a lost node would), or
``driver_exit:2`` (the driver dies once two blocks are done). The value travels to workers inside
the job context, so it works on any cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VLMQ_FAULT"


def fault_from_env() -> str | None:
    return os.environ.get(ENV) or None


def maybe_fail(fault: str | None, stage: str, block: int, work_dir: str) -> None:
    if not fault:
        return
    kind, _, arg = fault.partition(":")
    if not arg or int(arg) != block:
        return
    if kind == f"{stage}_raise":
        raise RuntimeError(f"injected fault {fault}")
    if kind == f"{stage}_exit":
        marker = Path(work_dir) / f".fault-{kind}-{block}"
        if not marker.exists():  # die once; the retry succeeds
            marker.write_text("1")
            os._exit(1)


def maybe_kill_driver(fault: str | None, blocks_done: int) -> None:
    if fault and fault.startswith("driver_exit:") and blocks_done >= int(fault.split(":")[1]):
        os._exit(17)
