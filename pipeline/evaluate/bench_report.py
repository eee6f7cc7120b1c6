"""``vlmq bench report``: vlmq's speed targets checked against a bench run, and the run's plots.

The targets (BENCHMARKS.md, "Targets"): W4 g128 M=1 on 8192 -> 28672 in <= 46 µs, W3 in <= 35 µs;
W4 at M=16 >= 3x cuBLAS fp16; M=2048 >= 0.9x cuBLAS fp16; a 7B-shape decode at batch 1 with W4
>= 2.8x and W3 >= 3.3x the fp16 model's tokens/s. ``vlmq bench kernels`` and ``vlmq bench decode``
judge their own run at the end (a section of kernels.md / decode.md, and kernels.png / decode.png);
``vlmq bench report`` does it again from their JSON, e.g. on a laptop after the run came back from
the GPU machine, and writes targets.md.

    vlmq bench report --kernels bench-kernels/kernels.json --decode bench-decode/decode.json --out bench-report

A target is checked only on the rows a run has: a run of other shapes or variants says "not
measured" for it, never "met". Ratios are recomputed from the times measured side by side in the
run (ours vs the cuBLAS fp16 row of the same shape and M; each decode variant vs fp16 at its batch).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

Row = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One line of the issue's table. ``pick`` selects the rows it is judged on (every one must pass),
    ``value`` reads the number compared with ``bound`` (``at_most``: a time; otherwise a ratio)."""

    name: str
    source: str  # "kernels" | "decode"
    pick: Callable[[Row], bool]
    value: Callable[[Row, list[Row]], float | None]
    bound: float
    at_most: bool = False
    unit: str = "x"
    note: str = ""


def _us(r: Row, rows: list[Row]) -> float | None:
    return r.get("us")


def vs_cublas(r: Row, rows: list[Row]) -> float | None:
    """cuBLAS fp16's time over ours, both from the same run, shape and M."""
    base = [c["us"] for c in rows if c.get("impl") == "cublas" and (c["k"], c["n"], c["m"]) == (r["k"], r["n"], r["m"])]
    return base[0] / r["us"] if base and r.get("us") else None


def vs_fp16(r: Row, rows: list[Row]) -> float | None:
    """Tokens/s over the fp16 model's at the same batch, in the same run."""
    base = [c["tokens_per_s"] for c in rows if c.get("variant") == "fp16" and c["batch"] == r["batch"]]
    return r["tokens_per_s"] / base[0] if base and r.get("tokens_per_s") else None


def _ours(bits: int, m: int, shape: tuple[int, int] | None = None, group: int | None = 128) -> Callable[[Row], bool]:
    def pick(r: Row) -> bool:
        return (r.get("impl") == "ours" and r.get("bits") == bits and r.get("m") == m and r.get("group") == group
                and (shape is None or (r["k"], r["n"]) == shape))
    return pick


def _variant(name: str, batch: int = 1) -> Callable[[Row], bool]:
    return lambda r: r.get("variant") == name and r.get("batch") == batch


BIG = (8192, 28672)
TARGETS: tuple[Target, ...] = (
    Target("W4 g128 M=1, 8192 -> 28672", "kernels", _ours(4, 1, BIG), _us, 46.0, at_most=True, unit="µs"),
    Target("W3 g128 M=1, 8192 -> 28672", "kernels", _ours(3, 1, BIG), _us, 35.0, at_most=True, unit="µs"),
    Target("W4 M=16 vs cuBLAS fp16, 8192 -> 28672", "kernels", _ours(4, 16, BIG), vs_cublas, 3.0),
    Target("W4 M=16 vs cuBLAS fp16, the other shapes", "kernels",
           lambda r: _ours(4, 16)(r) and (r["k"], r["n"]) != BIG, vs_cublas, 3.0),
    Target("M=2048 vs cuBLAS fp16, every shape and width", "kernels",
           lambda r: r.get("impl") == "ours" and r.get("m") == 2048, vs_cublas, 0.9),
    Target("decode batch 1, W4 vs fp16 tokens/s", "decode", _variant("w4"), vs_fp16, 2.8),
    Target("decode batch 1, W3 vs fp16 tokens/s", "decode", _variant("w3"), vs_fp16, 3.3),
    Target("decode batch 1, W4 with packed lm_head", "decode", _variant("w4+head"), vs_fp16, 2.8,
           note="`--quantize-lm-head`"),
    Target("decode batch 1, W3 with packed lm_head", "decode", _variant("w3+head"), vs_fp16, 3.3,
           note="`--quantize-lm-head`"),
)


@dataclass
class Outcome:
    target: Target
    values: list[tuple[str, float]]  # (which row, its value)
    status: str  # "met" | "missed" | "partly met" | "not measured"

    def passes(self, v: float) -> bool:
        return v <= self.target.bound if self.target.at_most else v >= self.target.bound


def _case(r: Row) -> str:
    if "variant" in r:
        return f"{r['variant']} b{r['batch']}"
    return f"{'W%d ' % r['bits'] if r.get('impl') == 'ours' else ''}{r['k']} -> {r['n']}"


def check(rows: list[Row], source: str) -> list[Outcome]:
    """Every target of ``source`` judged on ``rows`` (a run's JSON rows)."""
    out = []
    for t in TARGETS:
        if t.source != source:
            continue
        vals = [(_case(r), v) for r in rows if t.pick(r) for v in [t.value(r, rows)] if v is not None]
        o = Outcome(t, vals, "not measured")
        if vals:
            ok = [o.passes(v) for _, v in vals]
            o.status = "met" if all(ok) else "missed" if not any(ok) else "partly met"
        out.append(o)
    return out


def _fmt(v: float, unit: str) -> str:
    return f"{v:.1f} µs" if unit == "µs" else f"{v:.2f}x"


def targets_markdown(outcomes: list[Outcome]) -> str:
    lines = ["| target | bound | measured | status |", "|---|---:|---|---|"]
    for o in outcomes:
        t = o.target
        bound = ("<= " if t.at_most else ">= ") + _fmt(t.bound, t.unit)
        shown = ", ".join(f"{c} **{_fmt(v, t.unit)}**" if not o.passes(v) else f"{c} {_fmt(v, t.unit)}"
                          for c, v in o.values) or "-"
        lines.append(f"| {t.name}{' (' + t.note + ')' if t.note else ''} | {bound} | {shown} | {o.status} |")
    return "\n".join(lines) + "\n\nA bold value misses its bound.\n"


def targets_line(outcomes: list[Outcome]) -> str:
    """One line for the terminal: how many targets this run meets."""
    seen = [o for o in outcomes if o.status != "not measured"]
    met = sum(o.status == "met" for o in seen)
    bad = "; ".join(f"{o.target.name}: {o.status}" for o in seen if o.status != "met")
    return f"targets: {met} of {len(seen)} met" + (f" ({bad})" if bad else "")


# ----------------------------------------------------------------------------- plots

_STYLE = {"ours W4": ("C0", "o-"), "ours W3": ("C2", "s-"), "torch int4": ("C1", "^--"), "ours W4A8": ("C4", "d:")}


def _series_name(r: Row) -> str | None:
    if r.get("impl") == "ours":
        return f"ours W{r['bits']}"
    if r.get("impl") == "w4a8":
        return "ours W4A8"
    if r.get("impl") == "int4mm":
        return "torch int4"
    return None


def kernel_series(rows: list[Row]) -> dict[tuple[int, int], dict[str, list[tuple[int, float]]]]:
    """Per shape (K, N), per kernel: (M, speedup vs cuBLAS fp16) sorted by M."""
    out: dict[tuple[int, int], dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        name, sp = _series_name(r), vs_cublas(r, rows)
        if name is None or sp is None:
            continue
        out.setdefault((r["k"], r["n"]), {}).setdefault(name, []).append((r["m"], sp))
    return {s: {k: sorted(v) for k, v in d.items()} for s, d in out.items()}


_TICKS = (0.25, 0.5, 0.9, 1.0, 2.0, 3.0, 4.0)


def plot_kernels(rows: list[Row], meta: dict | None = None) -> Any:
    """One panel per shape: speedup over cuBLAS fp16 against M (log-log), the targets as red marks."""
    from matplotlib.figure import Figure

    series = kernel_series(rows)
    n = max(1, len(series))
    cols = min(3, n)
    nrows = -(-n // cols)
    fig = Figure(figsize=(4.4 * cols, 3.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, sharey=True, squeeze=False).ravel()
    for ax, ((k, nn), by) in zip(axes, sorted(series.items())):
        for name, pts in by.items():
            colour, style = _STYLE.get(name, ("C7", "x-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, label=name, ms=4)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="cuBLAS fp16")
        ax.plot([16], [3.0], "rv", ms=7, label="target W4 M=16")
        ax.plot([2048], [0.9], "r^", ms=7, label="target M=2048")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_yticks(_TICKS, [f"{t:g}x" for t in _TICKS])
        ax.minorticks_off()
        ax.set_title(f"{k} -> {nn}", fontsize=10)
        ax.set_xlabel("M (tokens)")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(series):]:
        ax.set_visible(False)
    axes[0].set_ylabel("speedup vs cuBLAS fp16")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("vlmq bench kernels" + (f": {meta['device']}, {meta['date']}" if meta else ""))
    return fig


def plot_decode(rows: list[Row], meta: dict | None = None) -> Any:
    """Tokens/s per variant, one group of bars per batch, each bar labelled with its ratio to fp16."""
    from matplotlib.figure import Figure

    batches = sorted({r["batch"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig = Figure(figsize=(max(5.0, 1.2 * len(variants) * len(batches)), 3.8), layout="constrained")
    axes = fig.subplots(1, max(1, len(batches)), squeeze=False)[0]
    for ax, b in zip(axes, batches):
        here = [r for r in rows if r["batch"] == b]
        xs = range(len(here))
        bars = ax.bar(xs, [r["tokens_per_s"] for r in here], color=[f"C{variants.index(r['variant'])}" for r in here])
        base = [r["tokens_per_s"] for r in here if r["variant"] == "fp16"]
        for bar, r in zip(bars, here):
            sp = vs_fp16(r, rows)
            if sp is not None:
                ax.annotate(f"{sp:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
            for t in TARGETS:  # the bound as a red bar across the column it judges
                if t.source == "decode" and base and t.pick(r):
                    ax.hlines(t.bound * base[0], bar.get_x(), bar.get_x() + bar.get_width(), colors="k", lw=2, linestyles="--",
                              label=None if ax.get_legend_handles_labels()[1] else "target")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8, loc="upper left")
        ax.set_xticks(list(xs), [r["variant"] for r in here], fontsize=8)
        ax.set_title(f"batch {b}", fontsize=10)
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("vlmq bench decode" + (f": {meta.get('model', '')}, {meta['device']}, {meta['date']}" if meta else ""))
    return fig


def save_plot(out: str, name: str, run: dict) -> str | None:
    """``out/<name>.png`` for a kernels or decode run. None for a run without rows, or (with a message)
    where matplotlib is missing, as on a bare GPU image: `vlmq bench report` draws it later from the JSON."""
    if not run["rows"]:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: no {name}.png (`vlmq bench report --{name} {name}.json` draws it)")
        return None
    fig = (plot_kernels if name == "kernels" else plot_decode)(run["rows"], run.get("meta"))
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=110)
    return path


def section(name: str, run: dict) -> str:
    """The targets of one run as a Markdown section (appended to kernels.md / decode.md, and targets.md)."""
    meta = run.get("meta") or {}
    head = f"## Targets ({name}: {meta.get('device', '?')}, {meta.get('date', '?')})\n\n"
    if meta.get("whatif"):  # VLMQ_DECODE_WHATIF left kernels out of the step: its outputs are wrong
        return head + f"Not judged: a what-if run (the step without {meta['whatif']}).\n"
    return head + targets_markdown(check(run["rows"], name))


def write_outputs(out: str, kernels: dict | None = None, decode: dict | None = None) -> list[str]:
    """targets.md and the PNGs for the runs given (each ``{"meta", "rows"}``); returns the paths written."""
    os.makedirs(out, exist_ok=True)
    runs = [(n, r) for n, r in (("kernels", kernels), ("decode", decode)) if r is not None]
    path = os.path.join(out, "targets.md")
    with open(path, "w") as f:
        f.write("# Speed targets\n\n" + "\n".join(section(n, r) for n, r in runs))
    written = [path]
    for n, r in runs:
        p = save_plot(out, n, r)
        if p:
            written.append(p)
    return written


# ----------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="check the speed targets and plot a kernels / decode run's JSON",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", metavar="JSON", help="kernels.json written by `vlmq bench kernels`")
    p.add_argument("--decode", metavar="JSON", help="decode.json written by `vlmq bench decode`")
    p.add_argument("--out", default="bench-report", help="folder for targets.md, kernels.png, decode.png")
    p.set_defaults(func=run)


def load_run(path: str, kind: str) -> dict:
    """A bench JSON, checked before anything is written: a clear error names the file and the fix."""
    from ..errors import VlmqError

    fix = f"pass the {kind}.json that `vlmq bench {kind}` wrote into its --out folder"
    if not os.path.isfile(path):
        raise VlmqError(f"{path} does not exist", fix)
    try:
        with open(path) as f:
            run = json.load(f)
    except ValueError as e:
        raise VlmqError(f"{path} is not valid JSON ({e})", fix) from None
    rows = run.get("rows") if isinstance(run, dict) else None
    need = "us" if kind == "kernels" else "tokens_per_s"
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and need in r for r in rows):
        raise VlmqError(f"{path} is not a `vlmq bench {kind}` result (no rows with '{need}')", fix)
    return run


def run(args: argparse.Namespace) -> int:
    from ..errors import VlmqError

    if not args.kernels and not args.decode:
        raise VlmqError("nothing to report", "pass --kernels kernels.json and/or --decode decode.json")
    kernels = load_run(args.kernels, "kernels") if args.kernels else None
    decode = load_run(args.decode, "decode") if args.decode else None
    for path in write_outputs(args.out, kernels, decode):
        print("wrote", path)
    for name, r in (("kernels", kernels), ("decode", decode)):
        if r is not None and not (r.get("meta") or {}).get("whatif"):
            print(f"{name}: {targets_line(check(r['rows'], name))}")
    return 0
