"""``vlmq report JOBDIR``: the report of a quantize job (report.md, report.html, PNG plots).

JOBDIR is a checkpoint folder written by ``vlmq quantize`` (its ``report.json``), the job's work
folder (``result.json``), or a report JSON file. The report goes to ``--out`` (default
``JOBDIR-report`` beside it: writing into the checkpoint would add files its manifest does not
list, and ``vlmq validate`` would then refuse it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import VlmqError

NAMES = ("report.json", "result.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="per-layer search error, MBQ ratios, Q-VLM partition, stage times of a quantize job",
                              epilog="example:  vlmq report w3-mbq   (writes w3-mbq-report/report.html)",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobdir", metavar="JOBDIR", help="checkpoint folder (report.json), work folder (result.json) or JSON file")
    p.add_argument("--out", default=None, help="output folder (default JOBDIR-report)")
    p.set_defaults(func=cmd_report)


def find_report(path: str | Path) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise VlmqError(f"{p} does not exist", "pass a checkpoint folder written by `vlmq quantize`")
    f = p if p.is_file() else next((p / n for n in NAMES if (p / n).is_file()), None)
    if f is None:
        raise VlmqError(f"{p} has no report.json or result.json", "pass a checkpoint folder written by `vlmq quantize`")
    try:
        report = json.loads(f.read_text())
    except ValueError as e:
        raise VlmqError(f"{f} is not valid JSON ({e})", "re-run the quantize job, or restore the file") from None
    if not isinstance(report, dict):
        raise VlmqError(f"{f} is not a job report", "pass a checkpoint folder written by `vlmq quantize`")
    return f, report


def write_job_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """report.md + PNGs (``job_report.render``) + a standalone report.html with the PNGs embedded."""
    from .job_report import render, sections
    from .report import html_page

    out = Path(out_dir)
    files = render(report, out)
    title = f"vlmq quantize report: {report.get('recipe_label') or ''}".strip()
    page = out / "report.html"
    page.write_text(html_page(title, sections(report, out)))
    return [*files, page]


def cmd_report(ns: argparse.Namespace) -> int:
    f, report = find_report(ns.jobdir)
    base = f.parent if f.name in NAMES else f.with_suffix("")
    out = Path(ns.out) if ns.out else base.parent / f"{base.name}-report"
    files = write_job_report(report, out)
    print(f"vlmq report: {len(files)} files in {out}; open {out / 'report.html'}")
    return 0
