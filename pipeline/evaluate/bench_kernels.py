"""``vlmq bench kernels``: our packed kernels vs cuBLAS fp16 vs torch's int4 kernel, on one GPU.

Every time is the median over many replays of a CUDA graph holding several calls (launch gaps
amortized), with weights rotated over enough copies to exceed L2. The byte floor of a row is
(packed weight + x + y bytes) / copy bandwidth, the copy bandwidth (read + write) measured in
the same run. Writes to ``--out``: ``kernels.json``; ``kernels.md``, the table, then vlmq's speed
targets judged on this run's rows (`vlmq bench report --help` lists them); and ``kernels.png``, the
speedup over cuBLAS against M, one panel per shape.
Columns: µs; GB/s achieved (bytes moved / time); % of the byte floor; speedup over cuBLAS fp16.
A row's ``[...]`` names the launch the autotuner picked for it.

    python -m pipeline.evaluate.bench_kernels --out bench-out            # the issue's table
    python -m pipeline.evaluate.bench_kernels --sweep --shapes 8192x28672 --m 1 16 --out sweep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

SHAPES = ["8192x28672", "28672x8192", "8192x8192", "3584x18944", "18944x3584", "3584x4608"]  # in x out
MS = [1, 4, 16, 64, 512, 2048]
L2_BYTES = 50 << 20


@dataclass
class Case:
    impl: str  # "ours" | "gemv" | "gemm" | "w4a8" | "cublas" | "int4mm"
    k: int
    n: int
    m: int
    bits: int = 16
    group: int | None = 128
    sym: bool = False
    cfg: dict = field(default_factory=dict)
    label: str = ""

    def key(self) -> str:
        return self.label or self.impl


def register(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="time the packed kernels vs cuBLAS fp16 and torch int4 (GPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=run)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench-kernels", help="folder for kernels.json and kernels.md")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="IN x OUT, e.g. 8192x28672")
    p.add_argument("--m", nargs="+", type=int, default=MS, help="rows of x (tokens)")
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3], help="weight bits of our A16 rows")
    p.add_argument("--group", type=int, default=128, help="group size (0: per-channel)")
    p.add_argument("--sym", action="store_true", help="symmetric weights (default asymmetric)")
    p.add_argument("--no-baselines", action="store_true", help="skip cuBLAS fp16 and torch int4")
    p.add_argument("--w4a8", action="store_true", help="add W4A8 rows")
    p.add_argument("--sweep", action="store_true", help="time launch-config variants instead of the defaults")
    p.add_argument("--only", nargs="*", default=[], help="with --sweep: keep the variants whose name contains one of these")
    p.add_argument("--reps", type=int, default=20, help="timed graph replays")
    p.add_argument("--calls", type=int, default=0, help="calls per graph (0: auto)")
    p.add_argument("--jobs", type=int, default=0, help="processes that pre-compile the kernels (0: auto)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps: checks the script itself")


# ----------------------------------------------------------------------------- cases


def _sweep_variants(bits: int, m: int, k: int, n: int) -> list[tuple[str, dict]]:
    """Launch configs worth comparing for one M (kept small: each one is a compile)."""
    out: list[tuple[str, dict]] = []
    if m <= 4:
        rs = [4, 2, 1] if bits == 3 else [16, 8, 4]
        grid = [(128, rs[0], 4, 8), (128, rs[0], 4, 4), (128, rs[1], 4, 8), (128, rs[0], 8, 8), (256, rs[0], 8, 8),
                (256, rs[1], 4, 4), (128, rs[0], 4, 16), (128, rs[2], 4, 8)]
        if k * n < 8192 * 28672:  # decode-size layers: mostly the split matters
            grid = [(128, rs[0], 4, w) for w in (2, 4, 8, 16)] + [(128, rs[1], 4, 8), (256, rs[0], 8, 4)]
        if bits in (3, 4) and k % 4 == 0:  # fp16 pairs apply: of the fp32 GEMV the two best of run 4
            grid = [(128, rs[0], 4, 8), (128, rs[0], 4, 16)]
        for bn, r, w, waves in grid:
            out.append((f"gemv BN{bn} R{r} w{w} x{waves}", {"impl": "gemv", "BN": bn, "R": r, "num_warps": w,
                                                             "waves": waves, "h2": False}))
        if bits in (3, 4) and k % 4 == 0:  # the fp16-pair kernel (gemv_h2.py)
            rh = [4, 2] if bits == 3 else [16, 8]
            for bn, r, w, waves, d in [(64, rh[0], 4, 8, 1), (64, rh[0], 4, 6, 1), (64, rh[0], 4, 12, 1),
                                       (64, rh[0], 4, 4, 1), (64, rh[1], 4, 8, 1), (64, rh[0], 4, 8, 2),
                                       (128, rh[0], 4, 4, 1), (128, rh[0], 4, 6, 1), (128, rh[0], 4, 8, 1),
                                       (128, rh[1], 4, 16, 1), (64, rh[0], 8, 8, 1)]:
                out.append((f"h2 BN{bn} R{r} w{w} x{waves}{' d2' if d == 2 else ''}",
                            {"impl": "gemv", "BN": bn, "R": r, "num_warps": w, "waves": waves, "h2": True,
                             "depth": d}))
            for bn, r, wv, mr in (((64, 16, 8, 64), (64, 16, 5, None), (64, 16, 7, 72)) if bits == 4 else
                                  ((128, 4, 7, 72), (128, 4, 6, None), (64, 4, 8, 64), (64, 4, 7, None))):
                out.append((f"h2 BN{bn} R{r} w4 sk{wv}{f' r{mr}' if mr else ''}",
                            {"impl": "gemv", "BN": bn, "R": r, "num_warps": 4, "waves": wv, "h2": True,
                             "stream_k": True, "maxnreg": mr}))
            for bn, r, wv in ((64, rh[0], 8), (128, rh[0], 4), (128, rh[0], 6)):  # run 12: L2 256 B fetch hint
                out.append((f"h2 BN{bn} R{r} w4 x{wv} nc256", {"impl": "gemv", "BN": bn, "R": r, "num_warps": 4,
                                                                "waves": wv, "h2": True, "evict": 2}))
            # run 12: x loaded where used (W3 72 -> 64 registers, no spills: 8 programs of 4 warps per SM)
            xl = (((128, 4, 4, 8), (128, 4, 4, 6), (64, 4, 2, 16), (64, 4, 4, 8)) if bits == 3 else
                  ((64, 16, 4, 8), (64, 16, 4, 9)))
            for bn, r, w, wv in xl:
                out.append((f"h2 BN{bn} R{r} w{w} x{wv} xl{' nc256' if bits == 4 else ''}",
                            {"impl": "gemv", "BN": bn, "R": r, "num_warps": w, "waves": wv, "h2": True, "x_ahead": False,
                             "evict": 2 if bits == 4 else 1}))
            # run 13: an iteration over several groups, 4-8 warps a program: few or no k-splits
            wide = (((64, 16, 8, 4, 0), (64, 16, 8, 3, 0), (32, 16, 4, 6, 0), (32, 16, 4, 8, 0), (32, 16, 4, 6, 1),
                     (16, 16, 2, 14, 0), (16, 16, 2, 12, 0)) if bits == 3 else
                    ((64, 32, 8, 4, 1), (64, 32, 8, 3, 1), (32, 32, 4, 6, 1), (32, 32, 4, 8, 1), (32, 32, 4, 6, 0),
                     (16, 32, 2, 14, 1), (16, 32, 2, 12, 1)))
            for bn, r, w, wv, xa in wide:
                out.append((f"h2 BN{bn} R{r} w{w} x{wv}{'' if xa else ' xl'}{' nc256' if bits == 4 else ''} wide",
                            {"impl": "gemv", "BN": bn, "R": r, "num_warps": w, "waves": wv, "h2": True,
                             "x_ahead": bool(xa), "evict": 2 if bits == 4 else 1}))
            if bits == 4:  # run 15: BN64 (a gate/up pair) over two groups, 96 registers, 5 programs per SM
                out.append(("h2 BN64 R32 w4 x5 r96 xl nc256 wide", {"impl": "gemv", "BN": 64, "R": 32, "num_warps": 4,
                                                                   "waves": 5, "h2": True, "x_ahead": False, "evict": 2,
                                                                   "maxnreg": 96}))
            if bits == 3:  # run 12 ncu: W3 at 74 registers holds 24 warps per SM (W4: 32) and stalls on memory;
                # register caps for 28-32 warps (64 spills 40 bytes), and 2-warp programs
                for bn, r, w, wv, mr in ((128, 4, 4, 7, 72), (128, 4, 4, 8, 64), (64, 4, 2, 14, 72), (64, 4, 2, 12, 72),
                                         (64, 4, 2, 16, 64)):
                    out.append((f"h2 BN{bn} R{r} w{w} x{wv} r{mr}", {"impl": "gemv", "BN": bn, "R": r, "num_warps": w,
                                                                     "waves": wv, "h2": True, "maxnreg": mr}))
            if bits == 3:  # run 8: W3 BN128 R4 with 3 k-splits beat the waves-derived 4; scan the split itself
                for bn, r, sp in [(128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 4, 5), (128, 4, 6), (128, 4, 8),
                                  (64, 4, 2), (64, 4, 3), (128, 2, 3), (128, 2, 6)]:
                    out.append((f"h2 BN{bn} R{r} w4 split{sp}", {"impl": "gemv", "BN": bn, "R": r, "num_warps": 4,
                                                                 "split": sp, "h2": True}))
    if 2 <= m <= 64 and bits in (3, 4):  # the fp16-pair tensor-core GEMM (gemm_h2.py)
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        for bn, w, waves, mr in [(128, 4, 4, 128), (128, 4, 4, None), (64, 4, 6, None), (64, 4, 4, None),
                                 (128, 4, 3, None), (128, 4, 2, 128), (256, 8, 2, 128), (128, 8, 3, None),
                                 (128, 4, 8, 128), (128, 4, 12, 128), (128, 4, 16, 128),  # x8-16: run 11
                                 (128, 8, 2, None), (128, 8, 4, None), (256, 8, 2, None)]:  # run 13, BM >= 32
            out.append((f"tc-h2 BM{bm} BN{bn} w{w} x{waves}{f' r{mr}' if mr else ''}",
                        {"impl": "gemm", "BM": bm, "BN": bn, "h2": True, "waves": waves, "maxnreg": mr,
                         "num_warps": w}))
        out.append((f"tc-h2 BM{bm} BN128 w4 x4 r128 nc256", {"impl": "gemm", "BM": bm, "BN": 128, "h2": True, "waves": 4,
                                                             "maxnreg": 128, "num_warps": 4, "evict": 2}))
        for wv, mr, ev in ((4, 128, 2), (4, 128, 1), (3, None, 1), (12, 128, 1)):  # run 13: 16-byte word loads
            out.append((f"tc-h2 BM{bm} BN128 w4 x{wv}{f' r{mr}' if mr else ''}{' nc256' if ev == 2 else ''} perm",
                        {"impl": "gemm", "BM": bm, "BN": 128, "h2": True, "waves": wv, "maxnreg": mr,
                         "num_warps": 4, "evict": ev, "perm": True}))
        if bm >= 32:  # run 13: the scale after the dot, as before (two accumulators), side by side
            for bn, w, waves, mr in [(128, 4, 3, None), (128, 4, 4, 128), (256, 8, 2, 128), (128, 8, 2, None)]:
                out.append((f"tc-h2 BM{bm} BN{bn} w{w} x{waves}{f' r{mr}' if mr else ''} sa",
                            {"impl": "gemm", "BM": bm, "BN": bn, "h2": True, "waves": waves, "maxnreg": mr,
                             "num_warps": w, "scale_after": True}))
    if 4 <= m <= 64:
        bk = 64 if bits == 3 else 128
        bm = 16 if m <= 16 else 64
        for bn, bk_, st, waves, w in [(64, bk, 3, 4, 4), (64, 64, 3, 4, 4), (128, bk, 3, 4, 4), (64, bk, 3, 8, 4),
                                      (128, 64, 3, 4, 8)]:
            out.append((f"tc-trans BM{bm} BN{bn} BK{bk_} w{w} s{st} x{waves}",
                        {"impl": "gemm", "BM": bm, "BN": bn, "BK": bk_, "num_warps": w, "num_stages": st,
                         "trans": True, "evict": True, "waves": waves}))
    if m >= 256:
        for bm, bn, bk, w, st, tr in [(256, 128, 64, 8, 3, False), (128, 128, 64, 8, 3, False),
                                      (128, 256, 64, 8, 3, False), (256, 128, 64, 8, 3, True),
                                      (128, 128, 64, 4, 4, True), (256, 128, 64, 8, 4, False)]:
            out.append((f"gemm{' trans' if tr else ''} BM{bm} BN{bn} BK{bk} w{w} s{st}",
                        {"impl": "gemm", "BM": bm, "BN": bn, "BK": bk, "num_warps": w, "num_stages": st, "trans": tr}))
        out.append(("dequant + cuBLAS", {"impl": "deqmm"}))
    return out


def build_cases(a) -> list[Case]:
    cases: list[Case] = []
    group = a.group or None
    for shape in a.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        for m in a.m:
            if not a.no_baselines:
                cases.append(Case("cublas", k, n, m, label="cuBLAS fp16"))
                if k % 128 == 0 and m <= 64:  # tinygemm is a small-M kernel
                    cases.append(Case("int4mm", k, n, m, bits=4, group=128, label="torch int4 g128 (bf16)"))
            for bits in a.bits:
                tag = f"W{bits} g{group or 'ch'}{' sym' if a.sym else ''}"
                if a.sweep:
                    for name, cfg in _sweep_variants(bits, m, k, n):
                        if a.only and not any(o in name for o in a.only):
                            continue
                        cases.append(Case(cfg["impl"], k, n, m, bits, group, a.sym, cfg, f"{tag} {name}"))
                else:
                    cases.append(Case("ours", k, n, m, bits, group, a.sym, {}, f"ours {tag}"))
            if a.w4a8:
                cases.append(Case("w4a8", k, n, m, 4, None, True, {}, "ours W4A8 (int8 TC)"))
    return cases


# ----------------------------------------------------------------------------- tensors


def _packed(bits: int, group: int | None, sym: bool, k: int, n: int, device, gen):
    """A PackedWeight of the right shapes filled with random codes/scales (no quantization needed)."""
    import torch

    from kernels.layout import DEFAULT_TILE, K_ALIGN, PackedWeight, field_plan

    p = field_plan(bits)
    tile = DEFAULT_TILE
    k_pad = -(-k // K_ALIGN) * K_ALIGN
    n_pad = -(-n // tile) * tile
    rows = k_pad // p.values_per_row * p.words_per_row
    words = torch.randint(-(2**31), 2**31 - 1, (n_pad // tile, rows, tile), dtype=torch.int32, device=device,
                          generator=gen)
    ng = 1 if group is None else k_pad // group
    scale = (torch.rand(n_pad // tile, ng, tile, device=device, generator=gen) * 0.02 + 0.001).half()
    zero = None if sym else torch.randint(0, 2**bits, (n_pad // tile, ng, tile), dtype=torch.uint8, device=device,
                                          generator=gen)
    return PackedWeight(words, scale, zero, bits, group, sym, k, n, tile)


def _copies(nbytes: int) -> int:
    return max(1, min(16, -(-3 * L2_BYTES // max(nbytes, 1))))


def make_fn(c: Case, device, seed: int = 0):
    """(callable(i) running call i, bytes moved per call)."""
    import torch

    from kernels import dispatch
    from kernels.tuning import GemmConfig, GemvConfig

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    dt = torch.bfloat16 if c.impl == "int4mm" else torch.float16
    x = torch.randn(c.m, c.k, device=device, generator=gen).to(dt)
    out_b = c.m * c.n * 2
    x_b = c.m * c.k * 2
    if c.impl == "cublas":
        w0 = (torch.randn(c.n, c.k, device=device, generator=gen) * 0.02).half()
        ws = [w0] + [w0.clone() for _ in range(_copies(w0.numel() * 2) - 1)]
        return (lambda i: torch.nn.functional.linear(x, ws[i % len(ws)])), w0.numel() * 2 + x_b + out_b
    if c.impl == "int4mm":
        wq = torch.randint(0, 256, (c.n, c.k // 2), dtype=torch.uint8, device=device, generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack(wq, 8)
        sz = (torch.rand(c.k // 128, c.n, 2, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        nb = wq.numel() + sz.numel() * 2
        ws = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(_copies(nb) - 1)]
        return (lambda i: torch.ops.aten._weight_int4pack_mm(x, ws[i % len(ws)][0], 128, ws[i % len(ws)][1])), \
            nb + x_b + out_b
    pw0 = _packed(c.bits, c.group, c.sym, c.k, c.n, device, gen)
    pws = [pw0] + [_packed(c.bits, c.group, c.sym, c.k, c.n, device, gen) for _ in range(_copies(pw0.nbytes()) - 1)]
    nb = pw0.nbytes() + x_b + out_b
    cfg = {k: v for k, v in c.cfg.items() if k != "impl"}
    if c.impl == "ours":
        return (lambda i: dispatch.matmul(x, pws[i % len(pws)])), nb
    if c.impl == "w4a8":
        return (lambda i: dispatch.w4a8(x, pws[i % len(pws)])), nb
    if c.impl == "gemv":
        g = GemvConfig(**cfg)
        return (lambda i: dispatch.gemv(x, pws[i % len(pws)], cfg=g)), nb
    if c.impl == "gemm":
        g = GemmConfig(**cfg)
        return (lambda i: dispatch.gemm(x, pws[i % len(pws)], cfg=g)), nb
    if c.impl == "deqmm":
        return (lambda i: dispatch.gemm_dequant(x, pws[i % len(pws)])), nb
    raise ValueError(c.impl)


# ----------------------------------------------------------------------------- timing


_CAPTURE_STREAM = None


def capture(fn, calls: int):
    """Warm ``fn`` up and capture ``calls`` calls of it in one CUDA graph; returns a function that
    replays the graph once and gives microseconds per call (it holds the graph).
    Without CUDA (the script's own CPU check under TRITON_INTERPRET=1): wall clock, no graph."""
    import torch

    if not torch.cuda.is_available():
        fn(0)

        def wall() -> float:
            t = time.perf_counter()
            for i in range(calls):
                fn(i)
            return (time.perf_counter() - t) * 1e6 / calls
        return wall

    for i in range(2):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    global _CAPTURE_STREAM
    if _CAPTURE_STREAM is None:  # one side stream for every capture: graphs outlive each other here, and
        # per-stream state (cuBLAS's workspace) set up on a stream freed since must not be reused
        _CAPTURE_STREAM = torch.cuda.Stream()
    s = _CAPTURE_STREAM
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()

    def once() -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1000.0 / calls
    # The graph holds the addresses of fn's tensors, not the tensors: once must keep fn (and what it
    # closes over) alive. Run 12: without this, the next capture (torch.cuda.graph empties the
    # allocator's cache) returned an earlier case's freed inputs to the driver, and replaying that
    # case in the interleaved rounds was an illegal memory access.
    once.keep = fn
    return once


def time_graph(fn, calls: int, reps: int) -> float:
    """Median microseconds per call over ``reps`` replays of ``calls`` calls captured in one graph."""
    once = capture(fn, calls)
    return statistics.median(once() for _ in range(reps))


def time_interleaved(onces: list, reps: int) -> list[float]:
    """Median microseconds per call of each captured graph, replayed round-robin (A B C A B C ...).
    Why: at M >= 512 both cuBLAS and ours are compute-bound under the power limit, and one case timed
    after the other met a hotter, slower-clocked GPU (run 11: the same dequantize + cuBLAS path 0.74x
    of cuBLAS in the table, 0.87x in a short call); alternating gives every case the same clocks."""
    ts: list[list[float]] = [[] for _ in onces]
    for _ in range(reps):
        for t, once in zip(ts, onces):
            t.append(once())
    return [statistics.median(t) for t in ts]


def time_cases(cases: list, calls: int = 20, reps: int = 15) -> list[tuple[str, float]]:
    """``(name, fn(i))`` cases, each run once, captured (``capture``) and then timed round-robin
    (``time_interleaved``): ``(name, microseconds per call)``. The experiment scripts' shared loop."""
    timers = []
    for _, fn in cases:
        fn(0)
        timers.append(capture(fn, calls))
    return list(zip([n for n, _ in cases], time_interleaved(timers, reps)))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    if not torch.cuda.is_available():
        return 1e10

    best = 0.0
    for dt, n in ((torch.float32, 1 << 28), (torch.uint8, 1 << 30)):  # 1 GiB each way
        a = torch.empty(n, dtype=dt, device="cuda").uniform_() if dt.is_floating_point else \
            torch.empty(n, dtype=dt, device="cuda").random_()
        b = torch.empty_like(a)
        us = time_graph(lambda i: b.copy_(a), calls=4, reps=10)
        best = max(best, 2 * a.numel() * a.element_size() / (us * 1e-6))
        del a, b
    return best


def _precompile(cases: list[Case], jobs: int) -> list[str]:
    """Compile every Triton kernel the cases need in parallel worker processes (fills the cache)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    ours = [asdict(c) for c in cases if c.impl not in ("cublas", "int4mm")]
    if not ours or jobs <= 1:
        return []
    chunks = [ours[i::jobs] for i in range(jobs)]
    errs: list[str] = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        for r in ex.map(_compile_worker, chunks):
            errs.extend(r)
    return errs


def _compile_worker(chunk: list[dict]) -> list[str]:
    import torch

    errs = []
    for d in chunk:
        c = Case(**d)
        try:
            fn, _ = make_fn(c, "cuda")
            fn(0)
            torch.cuda.synchronize()
        except Exception as e:  # reported, and the timing pass skips the case
            errs.append(f"{c.key()} k={c.k} n={c.n} m={c.m}: {type(e).__name__}: {str(e)[:300]}")
        finally:
            torch.cuda.empty_cache()
    return errs


# ----------------------------------------------------------------------------- report


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}; "
        f"copy bandwidth {meta['copy_tbps']:.2f} TB/s (read + write).",
        "",
        "| in -> out | M | kernel | µs | GB/s | % of byte floor | x cuBLAS fp16 |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = f"{r['speedup_vs_cublas']:.2f}" if r.get("speedup_vs_cublas") else ""
        lines.append(f"| {r['k']} -> {r['n']} | {r['m']} | {r['label']} | {r['us']:.1f} | {r['gbps']:.0f} | "
                     f"{r['pct_floor']:.0f} | {sp} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import torch

    from pipeline.errors import VlmqError

    if args.quick:
        args.shapes, args.m, args.reps = ["1024x1536", "512x640"], [1, 16, 128], 5
    cpu = not torch.cuda.is_available()
    if cpu and not (args.quick and os.environ.get("TRITON_INTERPRET") == "1"):
        raise VlmqError("vlmq bench kernels needs a CUDA GPU",
                        "run it on a GPU machine (on CPU only `--quick` under TRITON_INTERPRET=1, to check the script)")
    if cpu:
        args.shapes, args.m, args.reps, args.calls = ["256x96"], [1, 3, 20], 1, 1
    device = "cpu" if cpu else "cuda"
    import triton

    os.makedirs(args.out, exist_ok=True)
    cases = build_cases(args)
    jobs = 1 if cpu else (args.jobs or min(12, os.cpu_count() or 1))
    t0 = time.time()
    errs = _precompile(cases, jobs)
    bad = {e.split(" k=")[0] for e in errs}
    print(f"compiled in {time.time() - t0:.0f}s with {jobs} processes; {len(errs)} failures", flush=True)
    for e in errs:
        print("  COMPILE/RUN FAILED:", e, flush=True)
    bw = copy_bandwidth()
    meta = {"device": "cpu (interpreter)" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "copy_tbps": bw / 1e12, "cmd": " ".join(sys.argv)}
    rows: list[dict] = []
    groups: dict[tuple, list[Case]] = {}
    for c in cases:  # one group per (shape, M): its cases are timed together, interleaved
        if c.key() in bad or (cpu and c.impl == "int4mm"):
            continue
        groups.setdefault((c.k, c.n, c.m), []).append(c)
    from kernels import autotune

    for group in groups.values():
        live = []  # (case, replay timer, bytes, autotuner's pick)
        for c in group:
            try:
                fn, nbytes = make_fn(c, device)
                fn(0)  # eager: the autotuner (ours) picks its path here, before capture
                picked = autotune.last() if c.impl in ("ours", "w4a8") else None
                live.append((c, capture(fn, args.calls or (20 if c.m <= 64 else 5)), nbytes, picked))
            except Exception as e:
                print(f"  FAILED {c.key()} k={c.k} n={c.n} m={c.m}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        times = time_interleaved([t for _, t, _, _ in live], args.reps)
        base = next((us for (c, *_), us in zip(live, times) if c.impl == "cublas"), None)
        for (c, _, nbytes, picked), us in zip(live, times):
            floor = nbytes / bw * 1e6
            r = {**asdict(c), "label": c.key() + (f" [{picked}]" if picked else ""), "us": us, "bytes": nbytes,
                 "gbps": nbytes / us / 1e3, "floor_us": floor, "pct_floor": 100 * floor / us}
            r["speedup_vs_cublas"] = base / us if base else None
            rows.append(r)
            print(f"{c.k:>6} -> {c.n:<6} M={c.m:<5} {r['label']:<52} {us:9.1f} us  {r['gbps']:6.0f} GB/s  "
                  f"{r['pct_floor']:5.1f}% floor  x{(r['speedup_vs_cublas'] or 0):.2f}", flush=True)
        del live
        if not cpu:
            torch.cuda.empty_cache()
    tuned = {repr(k): v for k, v in autotune.trace().items()}  # every candidate's eager time, per shape
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "errors": errs, "autotune": tuned}, f, indent=1, default=str)
    from . import bench_report

    result = {"meta": meta, "rows": rows}
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(to_markdown(rows, meta) + "\n" + bench_report.section("kernels", result))
    bench_report.save_plot(args.out, "kernels", result)
    print(bench_report.targets_line(bench_report.check(rows, "kernels")), flush=True)
    return 0 if not errs else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate.bench_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
