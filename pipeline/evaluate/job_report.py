"""The report of one quantize job, from its ``report.json``: what the search did, layer by layer.

:func:`render` writes ``report.md`` and PNG plots into a folder; the quantize job calls it on
its staging folder (so the files are hashed into the checkpoint's manifest), and
``vlmq report JOBDIR`` calls it (plus an HTML page) on any finished checkpoint. Sections, each
present only when the report has the data:

- summary: model, recipe, sizes, whether the lm_head was quantized, fidelity (answer / text
  tokens), validation;
- per-layer search error before/after: AWQ/MBQ groups' ``loss_rtn`` (plain RTN, the same loss)
  vs ``loss_final`` (after scaling and clipping); Q-VLM blocks' ``error_rtn`` vs ``error_final``;
- MBQ ratios ``r_attn`` / ``r_mlp`` per layer, with the median floor (used) and without;
- Q-VLM entropy profile and partition (``report["partition"]``: ``scores``, ``blocks``, ``tau``,
  ``mode``), drawn with ``quant.partition.plot_partition``;
- stage times.

Never raises on a report with missing or odd fields: a section that cannot be drawn says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import fmt, md_page, mib, pct, save_figure

GROUP_ORDER = ("qkv", "o", "gate_up", "down")


def head_quantized(report: dict[str, Any]) -> bool:
    """Whether the job packed the lm_head (``recipe.quantize_lm_head``)."""
    return bool((report.get("lm_head") or {}).get("quantized"))


def lm_head_line(report: dict[str, Any]) -> str:
    """What happened to the lm_head, in words (the summary and the job report both say it)."""
    h = report.get("lm_head") or {}
    if not h.get("quantized"):
        return "16-bit, not quantized (--quantize-lm-head packs it)"
    s = h.get("scheme") or {}
    g = "ch" if s.get("group_size") is None else f"g{s['group_size']}"
    line = (f"quantized W{s.get('bits', '?')} {g}{' sym' if s.get('symmetric') else ''} (RTN)"
            if s else "quantized")
    if h.get("shape"):
        line += f", {h['shape'][0]}x{h['shape'][1]}"
    if h.get("rel_weight_error") is not None:
        line += f", relative weight error {h['rel_weight_error']:.3g}"
    if h.get("untied"):
        line += "; tied embeddings untied (embed_tokens kept fp16)"
    return line + "; its effect is in the fidelity rows"


# ----------------------------------------------------------------------------- data extraction (pure)


def layer_errors(report: dict[str, Any]) -> dict[str, dict[int, tuple[float, float]]]:
    """AWQ/MBQ: group -> layer -> (error before = RTN, error after = search result)."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for b in report.get("blocks") or []:
        layers = ((b.get("metrics") or {}).get("layers")) or {}
        for layer, groups in layers.items():
            for g, m in (groups or {}).items():
                if isinstance(m, dict) and "loss_rtn" in m:
                    after = m.get("loss_final", m.get("loss_clip", m.get("loss_scaled", m["loss_rtn"])))
                    out.setdefault(g, {})[int(layer)] = (float(m["loss_rtn"]), float(after))
    return dict(sorted(out.items(), key=lambda kv: (GROUP_ORDER.index(kv[0]) if kv[0] in GROUP_ORDER else 99, kv[0])))


def block_errors(report: dict[str, Any]) -> list[tuple[list[int], float, float]]:
    """Q-VLM: (layers of the block, error before = RTN start, error after) per block."""
    out = []
    for b in sorted(report.get("blocks") or [], key=lambda b: b.get("block", 0)):
        m = b.get("metrics") or {}
        if "error_final" in m:
            before = m.get("error_rtn", m.get("error_start"))
            out.append((list(b.get("layers") or m.get("block_layers") or []), float(before), float(m["error_final"])))
    return out


def mbq_ratios(report: dict[str, Any]) -> dict[str, dict[str, list[float]]] | None:
    """``{"floored"|"unfloored": {"r_attn": [...], "r_mlp": [...]}}`` by layer, or None."""
    sens = report.get("sensitivity") or {}
    if not sens.get("ratios"):
        return None
    out = {}
    for key, name in (("ratios", "floored"), ("unfloored", "unfloored")):
        table = sens.get(key) or {}
        layers = sorted(table, key=int)
        out[name] = {r: [float(table[i].get(r, math.nan)) for i in layers] for r in ("r_attn", "r_mlp")}
    if sens.get("floor") == "none":
        out["floored"], out["unfloored"] = out["unfloored"], out["floored"]
    return out


def partition_info(report: dict[str, Any]) -> dict[str, Any] | None:
    part = report.get("partition") or (report.get("qvlm") or {}).get("partition")
    if isinstance(part, dict) and part.get("scores") is not None:
        return part
    return None


# ----------------------------------------------------------------------------- plots


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_layer_errors(errs: dict[str, dict[int, tuple[float, float]]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (g, by_layer) in enumerate(errs.items()):
        xs = sorted(by_layer)
        ax.plot(xs, [by_layer[x][0] for x in xs], "x--", color=f"C{i}", lw=1, alpha=0.7, label=f"{g} RTN")
        ax.plot(xs, [by_layer[x][1] for x in xs], "o-", color=f"C{i}", lw=1.5, label=f"{g} searched")
    ax.set_yscale("log")
    _integer_x(ax)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("search loss (output error)")
    ax.set_title("Per-layer search error: RTN (dashed) vs after search (solid)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_block_errors(blocks: list[tuple[list[int], float, float]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 3.6), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(blocks)))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [b[1] for b in blocks], w, label="RTN start", color="C7")
    ax.bar([x + w / 2 for x in xs], [b[2] for b in blocks], w, label="after reconstruction", color="C0")
    ax.set_xticks(xs, [f"{b[0][0]}-{b[0][-1]}" if len(b[0]) > 1 else str(b[0][0]) for b in blocks], fontsize=8)
    ax.set_xlabel("block (decoder layers)")
    ax.set_ylabel("block output error")
    ax.set_title("Per-block reconstruction error before/after")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_ratios(r: dict[str, dict[str, list[float]]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(("r_attn", "r_mlp")):
        xs = list(range(len(r["floored"][name])))
        ax.plot(xs, r["floored"][name], "o-", color=f"C{i}", label=f"{name} (median floor: used)")
        ax.plot(xs, r["unfloored"][name], "x--", color=f"C{i}", alpha=0.7, label=f"{name} (no floor)")
    _integer_x(ax)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("g_vision / g_answer")
    ax.set_title("MBQ sensitivity ratios")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_stages(stages: dict[str, float]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 0.45 * len(stages) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    names = list(stages)
    ax.barh(names, [stages[n] for n in names], color="C2")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"Stage times (total {sum(stages.values()):.1f} s)")
    ax.grid(alpha=0.3, axis="x")
    return fig


# ----------------------------------------------------------------------------- sections


def _safe(parts: list[Any], what: str, fn: Callable[[], list[Any]]) -> list[Any]:
    try:
        return parts + fn()
    except Exception as e:  # a report is never worth failing a job for
        return parts + [("text", f"({what} could not be drawn: {type(e).__name__}: {e})")]


def sections(report: dict[str, Any], out_dir: Path) -> list[tuple[str, list[Any]]]:
    """The report's sections (text, tables, PNGs written into ``out_dir``)."""
    secs: list[tuple[str, list[Any]]] = []
    spec = report.get("spec") or {}
    recipe = spec.get("recipe") or {}
    sizes = report.get("sizes") or {}
    rows = [["model", f"{report.get('model', '?')} ({report.get('family', '?')})"],
            ["recipe", report.get("recipe_label") or recipe.get("method", "?")]]
    if "quantized_linears" in report:
        head = head_quantized(report)  # quantized_linears counts the head too
        rows.append(["quantized", f"{report['quantized_linears'] - head} Linears in {report.get('quantized_layers')} "
                                  f"layers" + (" + the lm_head" if head else "")])
    if "lm_head" in report:
        rows.append(["lm_head", lm_head_line(report)])
    if sizes.get("before") and sizes.get("after"):
        rows.append(["weights", f"{mib(sizes['before'])} MiB -> {mib(sizes['after'])} MiB "
                                f"({sizes['before'] / sizes['after']:.2f}x smaller)"])
    data = report.get("data") or {}
    if data:
        rows.append(["calibration", f"{data.get('calibration_rows', '?')} rows + {data.get('holdout_rows', '?')} held out; "
                                    f"{data.get('skipped_total', 0)} skipped"])
    val = report.get("validation")
    if isinstance(val, dict):
        rows.append(["validation", "passed" if val.get("ok") else "FAILED"])
    secs.append(("Summary", [("table", ["what", "value"], rows)]))
    fid = report.get("fidelity") or {}
    if fid:
        secs.append(("Fidelity vs fp (held-out rows)", [("table", ["tokens of", "KL(fp||quant)", "top-1 agree %", "tokens"], [
            [k, fmt(v.get("kl")), pct(v.get("top1")), v.get("tokens")] for k, v in fid.items() if isinstance(v, dict)])]))

    def errors_part() -> list[Any]:
        errs = layer_errors(report)
        blocks = block_errors(report)
        parts: list[Any] = []
        if errs:
            parts.append(("img", save_figure(plot_layer_errors(errs), out_dir / "layer_errors.png")))
            layers = sorted({x for v in errs.values() for x in v})
            hdr = ["layer"] + [f"{g} RTN -> searched" for g in errs]
            parts.append(("table", hdr, [[str(x)] + [
                f"{fmt(errs[g][x][0])} -> {fmt(errs[g][x][1])}" if x in errs[g] else "" for g in errs] for x in layers]))
        if blocks:
            parts.append(("img", save_figure(plot_block_errors(blocks), out_dir / "block_errors.png")))
            parts.append(("table", ["block layers", "RTN start", "after", "reduction %"], [
                [",".join(map(str, b[0])), fmt(b[1]), fmt(b[2]), pct(1 - b[2] / b[1]) if b[1] else ""] for b in blocks]))
        if not parts:
            parts.append(("text", "This method records no search error (RTN has nothing to search)."))
        return parts

    secs.append(("Search error per layer, before / after", _safe([], "search error", errors_part)))
    ratios = mbq_ratios(report)
    if ratios:
        def ratio_part() -> list[Any]:
            n = len(ratios["floored"]["r_attn"])
            return [("img", save_figure(plot_ratios(ratios), out_dir / "mbq_ratios.png")),
                    ("table", ["layer", "r_attn", "r_attn no floor", "r_mlp", "r_mlp no floor"], [
                        [str(i), fmt(ratios["floored"]["r_attn"][i]), fmt(ratios["unfloored"]["r_attn"][i]),
                         fmt(ratios["floored"]["r_mlp"][i]), fmt(ratios["unfloored"]["r_mlp"][i])] for i in range(n)])]
        secs.append(("MBQ sensitivity ratios", _safe(
            [("text", f"floor: {(report.get('sensitivity') or {}).get('floor', '?')}")], "ratios", ratio_part)))
    part = partition_info(report)
    if part:
        def part_part() -> list[Any]:
            from ..quant.partition import plot_partition, quantile_threshold

            scores = [math.nan if s is None else float(s) for s in part["scores"]]
            blocks = part.get("blocks") or [b.get("layers") for b in report.get("blocks") or []]
            tau = part.get("tau")
            if tau is None and part.get("p") is not None:
                tau = quantile_threshold(scores, float(part["p"]))
            mode = part.get("mode", "entropy")
            fig = plot_partition(scores, blocks, tau, title=f"Q-VLM partition ({mode})",
                                 ylabel="entropy (nats)" if mode == "entropy" else "score (nats)")
            return [("img", save_figure(fig, out_dir / "qvlm_partition.png")),
                    ("text", f"blocks: {' | '.join('-'.join(map(str, (b[0], b[-1]))) if len(b) > 1 else str(b[0]) for b in blocks)}"
                             f"; tau {fmt(tau)}")]
        secs.append(("Q-VLM entropy profile and partition", _safe([], "partition", part_part)))
    stages = {k: float(v) for k, v in (report.get("stages_s") or {}).items()}
    if stages:
        secs.append(("Stage times", _safe([("table", ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in stages.items()])],
                                          "stage times", lambda: [("img", save_figure(plot_stages(stages), out_dir / "stages.png"))])))
    return secs


def render(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``out_dir/report.md`` and its PNGs (flat in ``out_dir``); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secs = sections(report, out)
    title = f"vlmq quantize report: {report.get('recipe_label') or ''}".strip()
    md = out / "report.md"
    md.write_text(md_page(title, secs, out))
    return [md, *[p[1] for _, parts in secs for p in parts if p[0] == "img"]]
