"""Reports of ``vlmq eval``: ``report.md``, ``report.html`` (PNG plots embedded), ``plots/*.png``.

The table helpers (:func:`md_table`, :func:`html_page`) are shared with ``job_report``. Plots use
``matplotlib.figure.Figure`` directly (no pyplot state, safe in workers and threads).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLOTS_DIR = "plots"
NA = "n/a"


# ----------------------------------------------------------------------------- formatting


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return NA
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def pct(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) and not math.isnan(v) else fmt(v)


def mib(n: Any) -> str:
    return f"{n / 2**20:.2f}" if isinstance(n, (int, float)) and not isinstance(n, bool) else fmt(n)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.err{color:#b00}
img{max-width:100%;border:1px solid #eee;margin:6px 0}p.note{color:#555;font-size:0.9em}"""


def html_page(title: str, sections: Sequence[tuple[str, list[Any]]]) -> str:
    """A standalone page. Section parts: ``("table", headers, rows)``, ``("img", path)``,
    ``("text", str)``."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, parts in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for part in parts:
            if part[0] == "table":
                out.append(html_table(part[1], part[2]))
            elif part[0] == "img":
                data = base64.b64encode(Path(part[1]).read_bytes()).decode()
                out.append(f"<img alt='{html.escape(Path(part[1]).stem)}' src='data:image/png;base64,{data}'>")
            else:
                out.append(f"<p class='note'>{html.escape(str(part[1]))}</p>")
    out.append("</body></html>")
    return "\n".join(out)


def md_page(title: str, sections: Sequence[tuple[str, list[Any]]], base: Path) -> str:
    out = [f"# {title}", ""]
    for heading, parts in sections:
        out += [f"## {heading}", ""]
        for part in parts:
            if part[0] == "table":
                out += [md_table(part[1], part[2]), ""]
            elif part[0] == "img":
                rel = Path(part[1]).relative_to(base).as_posix()
                out += [f"![{Path(part[1]).stem}]({rel})", ""]
            else:
                out += [str(part[1]), ""]
    return "\n".join(out)


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------- eval report


def _by(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == kind]


def _bits(row_or_ckpt: dict[str, Any]) -> int:
    return 16 if row_or_ckpt.get("checkpoint_kind", row_or_ckpt.get("kind")) in ("builtin", "fp") else int(row_or_ckpt.get("wbits") or 0)


def summary_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Checkpoint x task headline metrics (+ weight size): the first table of every report."""
    tasks = [t["name"] for t in doc["tasks"] if t["kind"] != "speed"]
    metric = {}
    for r in doc["rows"]:
        if r["status"] == "ok" and r["task"] not in metric:
            metric[r["task"]] = r["headline"]["name"]
    headers = ["checkpoint", "recipe", "bits", "weights MiB"] + [
        f"{t} ({'accuracy %' if metric.get(t) == 'accuracy' else metric.get(t) or '-'})" for t in tasks]
    speed = any(t["kind"] == "speed" for t in doc["tasks"])
    if speed:
        headers += ["peak GPU MiB", "decode tok/s (b1)"]
    cell = {(r["checkpoint"], r["task"]): r for r in doc["rows"]}
    out = []
    for c in doc["checkpoints"]:
        line = [c["name"], c["label"], str(_bits({**c, "checkpoint_kind": c["kind"]})), mib(c["weight_bytes"])]
        for t in tasks:
            r = cell.get((c["name"], t))
            if r is None:
                line.append("")
            elif r["status"] != "ok":
                line.append("FAILED")
            else:
                name, v = r["headline"]["name"], r["headline"]["value"]
                line.append(pct(v) if name == "accuracy" else fmt(v))
        sp = cell.get((c["name"], "speed"))
        if speed and sp is None:
            line += ["", ""]
        elif speed and sp["status"] != "ok":
            line += ["FAILED", "FAILED"]
        elif speed:
            m = sp["metrics"]
            peak, tps = m.get("peak_gpu_mem_bytes"), m.get("decode_tokens_per_s")
            line += [mib(peak) if isinstance(peak, int) else fmt(peak), fmt(tps)]
        out.append(line)
    return headers, out


def summary_table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    headers, rows = summary_rows(doc)
    t = Table(title="vlmq eval", title_justify="left")
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    return t


def _sections(doc: dict[str, Any], out_dir: Path) -> list[tuple[str, list[Any]]]:
    rows = doc["rows"]
    headers, srows = summary_rows(doc)
    meta = doc["meta"]
    secs: list[tuple[str, list[Any]]] = [("Summary", [
        ("text", f"{len(doc['checkpoints'])} checkpoints x {len(doc['tasks'])} tasks, backend {meta['backend']}, "
                 f"{meta['items']} work items ({meta['resumed_items']} resumed, {meta['executed_items']} run) on "
                 f"{meta['workers']} workers, {meta['date']}. Accuracy in %; bits 16 = fp."),
        ("table", headers, srows)])]
    plots = plot_eval(doc, out_dir / PLOTS_DIR)
    if plots:
        secs.append(("Plots", [("img", p) for p in plots]))
    bv = [r for r in _by(rows, "builtin-vqa") if r["status"] == "ok"]
    if bv:
        skills = sorted({s for r in bv for s in r["per_skill"]})
        secs.append(("builtin-vqa per skill (accuracy %)", [("table", ["checkpoint", "all", *skills, "n"], [
            [r["checkpoint"], pct(r["accuracy"]), *[pct(r["per_skill"].get(s)) for s in skills], r["metrics"]["n"]]
            for r in bv])]))
    qa = [r for r in rows if r["kind"] in ("vqa", "mc") and r["status"] == "ok"]
    if qa:
        secs.append(("Open-ended VQA and multiple choice", [("table", [
            "checkpoint", "task", "accuracy %", "VQA consensus %", "parsed %", "scored", "skipped"], [
            [r["checkpoint"], r["task"], pct(r["accuracy"]), pct(r["metrics"].get("vqa_consensus")),
             pct(r["metrics"].get("parsed_rate")), r["metrics"]["n"], r["metrics"].get("skipped", 0)] for r in qa])]))
    fid = [r for r in _by(rows, "fidelity") if r["status"] == "ok"]
    if fid:
        trows = []
        for r in fid:
            m = r["metrics"]
            for mask in ("answer", "text"):
                f = m[mask]
                trows.append([r["checkpoint"], mask, fmt(f["kl"]), pct(f["top1"]), fmt(f["ppl_fp"]),
                              fmt(f["ppl_quant"]), f["tokens"]])
        secs.append(("Fidelity vs fp (held-out calibration-format rows)", [
            ("text", "answer: positions predicting answer tokens (vision-conditioned); text: positions predicting "
                     "prompt/template tokens. KL(fp || quant) in nats per token."),
            ("table", ["checkpoint", "tokens of", "KL", "top-1 agree %", "ppl fp", "ppl quant", "tokens"], trows)]))
    ppl = [r for r in _by(rows, "caption-ppl") if r["status"] == "ok"]
    if ppl:
        secs.append(("Caption perplexity", [("table", ["checkpoint", "task", "perplexity", "tokens"], [
            [r["checkpoint"], r["task"], fmt(r["metrics"]["perplexity"]), r["metrics"]["tokens"]] for r in ppl])]))
    sp = _by(rows, "speed")
    if sp:
        srows2 = []
        for r in sp:
            m = r.get("metrics") or {}
            peak = m.get("peak_gpu_mem_bytes")
            tps = m.get("decode_tokens_per_s")
            srows2.append([r["checkpoint"], r["label"], mib(r["weight_bytes"]),
                           mib(peak) if isinstance(peak, int) else fmt(peak) or "FAILED",
                           fmt(tps) if tps is not None else "FAILED", m.get("device", "")])
        secs.append(("Speed and memory (batch 1)", [("table", [
            "checkpoint", "recipe", "weights MiB (files)", "peak GPU MiB", "decode tokens/s", "device"], srows2)]))
    errs = [r for r in rows if r["status"] != "ok"]
    if errs:
        secs.append(("Errors", [("table", ["checkpoint", "task", "failed shards", "error"], [
            [r["checkpoint"], r["task"], f"{r.get('failed_shards', '?')}/{r['shards']}", r["error"]] for r in errs])]))
    return secs


def write_eval_report(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``report.md`` + ``report.html`` + PNGs for a ``vlmq eval`` results document."""
    out = Path(out_dir)
    secs = _sections(doc, out)
    md = out / "report.md"
    md.write_text(md_page("vlmq eval report", secs, out))
    page = out / "report.html"
    page.write_text(html_page("vlmq eval report", secs))
    return [md, page, *sorted((out / PLOTS_DIR).glob("*.png"))]


# ----------------------------------------------------------------------------- plots


def variant(row: dict[str, Any]) -> str:
    """The line a quantized row belongs to: method, plus what else changes the numbers."""
    v = str(row.get("method"))
    if (row.get("abits") or 16) < 16:
        v += f" A{row['abits']}"
    if row.get("group_size") not in (None, 128):
        v += f" g{row['group_size']}"
    elif row.get("group_size") is None and _bits(row) != 16 and "group_size" in row:
        v += " per-channel"
    if row.get("sym"):
        v += " sym"
    return v


def _series(rows: list[dict[str, Any]], value: Any) -> dict[str, tuple[dict[str, list[tuple[int, float]]], list[float]]]:
    """base model -> (variant -> sorted (bits, value) points, fp values)."""
    out: dict[str, tuple[dict[str, list[tuple[int, float]]], list[float]]] = {}
    for r in rows:
        v = value(r)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        series, fp = out.setdefault(str(r.get("base") or "model"), ({}, []))
        if _bits(r) == 16:
            fp.append(v)
        else:
            series.setdefault(variant(r), []).append((_bits(r), v))
    return {b: ({k: sorted(p) for k, p in sorted(s.items())}, fp) for b, (s, fp) in sorted(out.items())}


def plot_vs_bits(rows: list[dict[str, Any]], value: Any, ylabel: str, title: str, log: bool = False) -> Any:
    """One panel per base model; one line per method variant over weight bits; fp as a dashed line."""
    from matplotlib.figure import Figure

    by_base = _series(rows, value)
    n = max(1, len(by_base))
    fig = Figure(figsize=(min(4.6 * n, 13.8), 3.9), layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    variants = sorted({k for s, _ in by_base.values() for k in s})
    colour = {k: f"C{i % 10}" for i, k in enumerate(variants)}
    for ax, (base, (series, fp)) in zip(axes, by_base.items()):
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour[k], label=k)
        for j, v in enumerate(fp):
            ax.axhline(v, color="k", ls="--", lw=1, label="fp" if j == 0 else None)
        bits = sorted({b for pts in series.values() for b, _ in pts})
        if bits:
            ax.set_xticks(bits)
            ax.set_xlim(min(bits) - 0.5, max(bits) + 0.5)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("weight bits")
        ax.set_title(base, fontsize=10)
        ax.grid(alpha=0.3)
        if series or fp:
            ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    return fig


def plot_eval(doc: dict[str, Any], plots_dir: Path) -> list[Path]:
    """Accuracy vs bits per method for each accuracy task; KL vs bits for fidelity tasks."""
    out = []
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    for t in doc["tasks"]:
        rows = [r for r in ok if r["task"] == t["name"]]
        if not rows or not any(_bits(r) != 16 for r in rows):
            continue
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in t["name"])
        if t["kind"] in ("builtin-vqa", "vqa", "mc"):
            fig = plot_vs_bits(rows, lambda r: 100 * r["accuracy"], "accuracy (%)", f"{t['name']}: accuracy vs bits")
            out.append(save_figure(fig, plots_dir / f"accuracy_{safe}.png"))
        elif t["kind"] == "fidelity":
            fig = plot_vs_bits(rows, lambda r: (r["metrics"]["answer"]["kl"] or None) if _bits(r) != 16 else None,
                               "KL(fp || quant), answer tokens (nats)", f"{t['name']}: KL vs bits", log=True)
            out.append(save_figure(fig, plots_dir / f"kl_{safe}.png"))
    return out
