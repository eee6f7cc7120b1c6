"""`vlmq bench report`: the speed targets judged on a bench run's rows, its plots, and its input checks."""

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import VlmqError
from pipeline.evaluate import bench_report

RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "runs"


def _k(impl, k, n, m, us, bits=16, group=128):
    return {"impl": impl, "k": k, "n": n, "m": m, "us": us, "bits": bits, "group": group}


def _rows():
    """A hand-made run: the ratios below are worked out by hand from these times."""
    return [
        _k("cublas", 8192, 28672, 1, 160.0), _k("ours", 8192, 28672, 1, 45.0, 4), _k("ours", 8192, 28672, 1, 36.0, 3),
        _k("cublas", 8192, 28672, 16, 160.0), _k("ours", 8192, 28672, 16, 50.0, 4),  # 3.2x
        _k("cublas", 3584, 4608, 16, 20.0), _k("ours", 3584, 4608, 16, 10.0, 4),  # 2.0x
        _k("cublas", 8192, 8192, 2048, 950.0), _k("ours", 8192, 8192, 2048, 1000.0, 4),  # 0.95x
        _k("cublas", 8192, 28672, 2048, 800.0), _k("ours", 8192, 28672, 2048, 1000.0, 3),  # 0.8x
        _k("ours", 3584, 18944, 2048, 10.0, 4),  # no cuBLAS row of its own: no ratio, not judged
        _k("int4mm", 8192, 28672, 16, 80.0, 4),  # not ours: judged by nothing
    ]


def _by_name(outcomes):
    return {o.target.name: o for o in outcomes}


def test_kernel_targets_on_a_hand_made_run():
    got = _by_name(bench_report.check(_rows(), "kernels"))
    assert [o.status for o in got.values()] == ["met", "missed", "met", "missed", "partly met"]
    assert got["W4 g128 M=1, 8192 -> 28672"].values == [("W4 8192 -> 28672", 45.0)]
    assert got["W3 g128 M=1, 8192 -> 28672"].values == [("W3 8192 -> 28672", 36.0)]  # > 35 µs
    assert got["W4 M=16 vs cuBLAS fp16, 8192 -> 28672"].values == [("W4 8192 -> 28672", 3.2)]
    assert got["W4 M=16 vs cuBLAS fp16, the other shapes"].values == [("W4 3584 -> 4608", 2.0)]
    m2048 = got["M=2048 vs cuBLAS fp16, every shape and width"].values
    assert m2048 == [("W4 8192 -> 8192", 0.95), ("W3 8192 -> 28672", 0.8)]


def test_a_target_without_its_rows_is_not_measured_never_met():
    rows = [r for r in _rows() if r["m"] != 16]
    got = _by_name(bench_report.check(rows, "kernels"))
    assert got["W4 M=16 vs cuBLAS fp16, 8192 -> 28672"].status == "not measured"
    # a ratio needs the cuBLAS row of the same shape and M, measured in the same run
    lone = [_k("ours", 8192, 28672, 16, 10.0, 4)]
    assert _by_name(bench_report.check(lone, "kernels"))["W4 M=16 vs cuBLAS fp16, 8192 -> 28672"].status == \
        "not measured"
    dec = bench_report.check([{"variant": "w4", "batch": 1, "tokens_per_s": 500.0}], "decode")
    assert {o.status for o in dec} == {"not measured"}  # no fp16 row to compare with


def test_decode_targets_use_the_fp16_row_of_the_same_batch():
    rows = [{"variant": v, "batch": b, "tokens_per_s": t} for v, b, t in
            [("fp16", 1, 100.0), ("w4", 1, 290.0), ("w3", 1, 320.0), ("fp16", 8, 1000.0), ("w4", 8, 2000.0)]]
    got = _by_name(bench_report.check(rows, "decode"))
    assert got["decode batch 1, W4 vs fp16 tokens/s"].values == [("w4 b1", 2.9)]
    assert got["decode batch 1, W4 vs fp16 tokens/s"].status == "met"
    assert got["decode batch 1, W3 vs fp16 tokens/s"].status == "missed"  # 3.2 < 3.3
    assert got["decode batch 1, W4 with packed lm_head"].status == "not measured"
    md = bench_report.targets_markdown(list(got.values()))
    assert "w3 b1 **3.20x**" in md and "w4 b1 2.90x" in md
    # a what-if step (kernels left out, wrong outputs) is never judged
    whatif = bench_report.section("decode", {"meta": {"whatif": "attn"}, "rows": rows})
    assert "Not judged" in whatif and "| met |" not in whatif


def test_run15_records_agree_with_the_ratios_the_bench_stored():
    """Ratios recomputed from the stored times equal the ones `bench kernels` wrote when it ran."""
    run = json.loads((RUNS / "run15_bench.json").read_text())
    stored = {(r["k"], r["n"], r["m"], r["bits"]): r["speedup_vs_cublas"] for r in run["rows"] if r["impl"] == "ours"}
    got = _by_name(bench_report.check(run["rows"], "kernels"))
    m16 = got["W4 M=16 vs cuBLAS fp16, 8192 -> 28672"]
    assert m16.status == "missed" and m16.values[0][1] == pytest.approx(stored[(8192, 28672, 16, 4)], rel=1e-12)
    assert round(m16.values[0][1], 2) == 2.81  # BENCHMARKS.md, run 15
    assert got["W4 g128 M=1, 8192 -> 28672"].status == "met"
    assert len(got["M=2048 vs cuBLAS fp16, every shape and width"].values) == 12
    dec = _by_name(bench_report.check(json.loads((RUNS / "run15_decode_final.json").read_text())["rows"], "decode"))
    assert round(dec["decode batch 1, W4 vs fp16 tokens/s"].values[0][1], 2) == 2.53
    assert dec["decode batch 1, W4 with packed lm_head"].status == "met"


def test_plots_draw_the_rows_values():
    series = bench_report.kernel_series(_rows())
    assert series[(8192, 28672)]["ours W4"] == [(1, 160.0 / 45.0), (16, 3.2)]
    assert series[(8192, 28672)]["torch int4"] == [(16, 2.0)]
    fig = bench_report.plot_kernels(_rows())
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["3584 -> 4608", "8192 -> 28672", "8192 -> 8192"]
    big = next(ax for ax in panels if ax.get_title() == "8192 -> 28672")
    line = next(ln for ln in big.get_lines() if ln.get_label() == "ours W4")
    assert list(line.get_xdata()) == [1, 16] and list(line.get_ydata()) == [160.0 / 45.0, 3.2]
    rows = [{"variant": v, "batch": 1, "tokens_per_s": t} for v, t in [("fp16", 100.0), ("w4", 250.0)]]
    ax = bench_report.plot_decode(rows).axes[0]
    assert [p.get_height() for p in ax.patches] == [100.0, 250.0]
    assert [t.get_text() for t in ax.texts] == ["1.00x", "2.50x"]


def test_cli_refuses_bad_input_before_writing(tmp_path):
    out = tmp_path / "report"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"meta": {}, "rows": [{"variant": "w4"}]}))
    for argv, words in [([], "nothing to report"), (["--kernels", str(tmp_path / "none.json")], "does not exist"),
                        (["--kernels", str(bad)], "not a `vlmq bench kernels` result"),
                        (["--decode", str(bad)], "not a `vlmq bench decode` result")]:
        ns = _parse(argv + ["--out", str(out)])
        with pytest.raises(VlmqError, match=words):
            bench_report.run(ns)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(VlmqError, match="not valid JSON"):
        bench_report.run(_parse(["--decode", str(tmp_path / "broken.json"), "--out", str(out)]))
    assert not out.exists()


def test_cli_writes_targets_and_plots(tmp_path):
    k = tmp_path / "kernels.json"
    k.write_text(json.dumps({"meta": {"device": "X", "date": "today"}, "rows": _rows()}))
    assert bench_report.run(_parse(["--kernels", str(k), "--out", str(tmp_path / "r")])) == 0
    md = (tmp_path / "r" / "targets.md").read_text()
    assert "## Targets (kernels: X, today)" in md and "| partly met |" in md
    assert (tmp_path / "r" / "kernels.png").read_bytes()[:4] == b"\x89PNG"
    assert not os.path.exists(tmp_path / "r" / "decode.png")


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    bench_report.register(p.add_subparsers())
    return p.parse_args(["report", *argv])
