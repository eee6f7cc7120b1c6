"""`vlmq bench ...`, `vlmq eval ...`, `vlmq report ...`: registered by the subsystems that own them."""

from __future__ import annotations

import argparse
import importlib

# (module, description) for each `vlmq bench` target; each module exposes register(subparsers).
BENCH_MODULES = ("pipeline.evaluate.bench_kernels", "pipeline.evaluate.bench_decode", "pipeline.evaluate.bench_report")
TOP_MODULES = ("pipeline.evaluate.eval_cli", "pipeline.evaluate.report_cli")


def _try_register(module: str, sub: argparse._SubParsersAction) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:  # not written yet
            return
        raise
    mod.register(sub)


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="GPU benchmarks: kernels, decode speed; their targets and plots")
    bench_sub = bench.add_subparsers(dest="bench_target", metavar="TARGET")
    for m in BENCH_MODULES:
        _try_register(m, bench_sub)
    bench.set_defaults(func=lambda ns: (bench.print_help(), 2)[1])
    for m in TOP_MODULES:
        _try_register(m, sub)
