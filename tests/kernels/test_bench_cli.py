"""The `vlmq bench kernels|decode` entry points: registration contract, light import, CPU refusal."""

import argparse
import subprocess
import sys

import pytest


def test_register_adds_subcommands_with_run():
    from pipeline.evaluate import bench_decode, bench_kernels

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    bench_kernels.register(sub)
    bench_decode.register(sub)
    a = p.parse_args(["kernels", "--m", "1", "16", "--shapes", "8192x28672", "--out", "x"])
    assert a.func is bench_kernels.run and a.m == [1, 16] and a.shapes == ["8192x28672"]
    d = p.parse_args(["decode", "--batch", "1", "--variants", "fp16", "w4"])
    assert d.func is bench_decode.run and d.batch == [1] and d.variants == ["fp16", "w4"]


def test_import_does_not_load_torch():
    code = ("import sys; import pipeline.evaluate.bench_kernels, pipeline.evaluate.bench_decode; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_cases_cover_the_issue_table():
    from pipeline.evaluate import bench_kernels

    p = argparse.ArgumentParser()
    bench_kernels.add_args(p)
    cases = bench_kernels.build_cases(p.parse_args(["--w4a8"]))
    impls = {c.impl for c in cases}
    assert impls == {"cublas", "int4mm", "ours", "w4a8"}
    assert {(c.k, c.n) for c in cases} == {(8192, 28672), (28672, 8192), (8192, 8192), (3584, 18944),
                                          (18944, 3584), (3584, 4608)}
    assert {c.m for c in cases} == {1, 4, 16, 64, 512, 2048}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_decode_refuses_cpu_with_a_fix():
    from pipeline.errors import VlmqError
    from pipeline.evaluate import bench_decode

    p = argparse.ArgumentParser()
    bench_decode.add_args(p)
    with pytest.raises(VlmqError) as e:
        bench_decode.run(p.parse_args(["--tiny"]))
    assert e.value.fix


def test_decode_profile_summary_by_hand():
    """Per-step kernel times grouped by (name, grid); span vs busy shows the idle gaps."""
    from pipeline.evaluate.bench_decode import summarize_kernels

    ev = [{"cat": "kernel", "name": "gemv_h2_kernel", "ts": 0.0, "dur": 10.0, "args": {"grid": [72, 11, 1]}},
          {"cat": "kernel", "name": "_add_rmsnorm_kernel", "ts": 12.0, "dur": 3.0, "args": {"grid": [1, 1, 1]}},
          {"cat": "kernel", "name": "gemv_h2_kernel", "ts": 16.0, "dur": 30.0, "args": {"grid": [592, 2, 1]}},
          {"cat": "kernel", "name": "gemv_h2_kernel", "ts": 50.0, "dur": 10.0, "args": {"grid": [72, 11, 1]}},
          {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 99.0}]
    s = summarize_kernels(ev, steps=2)
    assert s["span_us_per_step"] == 30.0 and s["kernel_us_per_step"] == 26.5
    top = s["rows"][0]
    assert (top["grid"], top["us_per_step"], top["calls_per_step"]) == ("592x2x1", 15.0, 0.5)
    assert {(r["grid"], r["us_per_step"]) for r in s["rows"][1:]} == {("72x11x1", 10.0), ("1x1x1", 1.5)}
    assert summarize_kernels([], 1) == {}


def test_interleaved_timing_gives_every_case_the_same_drift():
    """A GPU that slows as it heats (a clock that adds 1 µs per replay): timed one case after the
    other, the second looks 8 µs slower; round-robin, the two identical cases come out 1 µs apart."""
    from pipeline.evaluate.bench_kernels import time_interleaved

    clock = {"t": 100.0}

    def case():
        clock["t"] += 1.0
        return clock["t"]

    a, b = time_interleaved([case, case], reps=9)
    assert (a, b) == (109.0, 110.0)  # medians of 101, 103, ... 117 and 102, 104, ... 118
    clock["t"] = 100.0
    seq = [time_interleaved([case], reps=9)[0] for _ in range(2)]
    assert seq == [105.0, 114.0]  # what timing them in turn would report


def test_quick_run_pairs_every_row_with_its_own_groups_cublas(tmp_path):
    """The script end to end on the interpreter (`--quick`): one row per case, and each ratio is the
    cuBLAS row of the same (shape, M) over the row's own time -- the grouping that interleaves them
    must not hand a row another group's baseline."""
    import json

    from pipeline.evaluate import bench_kernels

    assert bench_kernels.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert sorted((r["m"], r["impl"], r["bits"]) for r in rows) == sorted(
        (m, impl, b) for m in (1, 3, 20) for impl, b in (("cublas", 16), ("ours", 4), ("ours", 3)))
    base = {(r["k"], r["n"], r["m"]): r["us"] for r in rows if r["impl"] == "cublas"}
    for r in rows:
        assert r["speedup_vs_cublas"] == base[(r["k"], r["n"], r["m"])] / r["us"]
    md = (tmp_path / "kernels.md").read_text()
    assert md.count("| 256 -> 96 |") == len(rows)
    # the speed targets are judged only on their own shapes: a run without them measures none
    targets = md.split("## Targets")[1]
    assert targets.count("| not measured |") == 5 and "| met |" not in targets
    assert (tmp_path / "kernels.png").read_bytes()[:4] == b"\x89PNG"
