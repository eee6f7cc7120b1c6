"""The summary a user reads at the end of a job: what was quantized, sizes, fidelity, time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .job_report import head_quantized, lm_head_line


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    sizes = report.get("sizes", {})
    rows.append(("model", f"{report.get('model')} ({report.get('family')})"))
    rows.append(("recipe", report.get("recipe_label", "")))
    if "quantized_linears" in report:
        head = head_quantized(report)  # quantized_linears counts the head too
        rows.append(("quantized", f"{report['quantized_linears'] - head} Linears in {report['quantized_layers']} "
                                  f"decoder layers" + (" + the lm_head" if head else "")))
    if "lm_head" in report:
        rows.append(("lm_head", lm_head_line(report)))
    if sizes:
        rows.append(("weights", f"{sizes['before'] / 2**20:.2f} MiB -> {sizes['after'] / 2**20:.2f} MiB "
                                f"({sizes['before'] / max(sizes['after'], 1):.2f}x smaller)"))
    fid = report.get("fidelity") or {}
    for k in ("answer", "text"):
        if k in fid and fid[k].get("tokens"):
            f = fid[k]
            rows.append((f"fidelity ({k} tokens)", f"KL {f['kl']:.4g} nats, top-1 agreement {100 * f['top1']:.1f}% "
                                                    f"over {f['tokens']} tokens"))
    for name, acc in (report.get("accuracy") or {}).items():
        rows.append((f"accuracy ({name})", acc))
    val = report.get("validation")
    if isinstance(val, dict):
        rows.append(("validation", "passed" if val.get("ok") else "FAILED"))
    stages = report.get("stages_s") or {}
    if stages:
        rows.append(("wall time", ", ".join(f"{k} {v:.1f}s" for k, v in stages.items())
                     + f"; total {sum(stages.values()):.1f}s"))
    return rows


def print_summary(result: Any, console: Console | None = None) -> None:
    console = console or Console()
    report = result.report
    t = Table(title=f"vlmq: {result.out}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in summary_rows(report):
        t.add_row(k, str(v))
    console.print(t)
