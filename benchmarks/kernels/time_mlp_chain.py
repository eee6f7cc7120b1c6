"""Run 15: is a persistent decode kernel worth building? The MLP half of a 7B decode layer (gate/up
GEMV with the silu-mul epilogue, then the down GEMV adding into its fp32 buffer) as two PDL launches,
as the decode step runs it, against one persistent launch of the same two ``gemv_h2`` segments with a
grid-wide barrier between them (``kernels.pdl.grid_sync``) -- and against the same launch without the
barrier (wrong sums: the bound of what removing the boundary can give).

Why: run 14 left the decode target to "a persistent per-layer kernel whose phases overlap". Before
building one, this measures the two things it would trade: a kernel boundary (~1.2 µs in a graph,
run 14) against an in-kernel barrier, and whether the down projection's first weights, requested
before the barrier by programs that have no gate/up tile, shorten the chain.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_mlp_chain.py [--layers 28] [--reps 20]

Every program of the persistent launch must be resident at once (the barrier would never open
otherwise): the script sizes the grid from the compiled kernel's registers and refuses a grid over
the GPU's capacity. The down projection then runs as 112 column tiles x S k-splits, one unit per
program (S from that capacity), the gate/up's 592 tiles over the same programs.

Outcome (run 15, `runs/run15_mlpchain.log`, µs a layer): two PDL launches 45.52 (down in 9 splits) / 44.92
(7, as the persistent grid), one launch with the barrier 45.80, without it 42.94. The barrier costs more
than the launch boundary, and no boundary at all would save 2 µs: no persistent layer kernel was built.
Call 9 (`runs/run15_mlpchain80.log`, the kernel as it is now, one gate/up tile a program): 44.67 / 45.45 /
42.59 the same way. Uncapped (`runs/run15_mlpchain_uncapped.log`: 64 registers, 8 programs per SM, down in
9 splits) the barrier costs 5.6 µs and even the bound loses 1.6.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.dispatch import gemv  # noqa: E402
from kernels.gemv_h2 import _segment  # noqa: E402
from kernels.pdl import launch_dependents, launch_kwargs, programmatic_launch  # noqa: E402
from kernels.tuning import GemvConfig  # noqa: E402
from pipeline.evaluate.bench_decode import GLU_BLOCK, _random_qlinear  # noqa: E402

H, I = 3584, 18944  # Qwen2-7B hidden and intermediate sizes
GU = GemvConfig(BN=64, R=16, num_warps=4, waves=6)  # run 14's picks for the two launches
DOWN = GemvConfig(BN=32, R=32, num_warps=4, waves=8, evict=2)


@triton.jit
def mlp_chain_kernel(xq, gu_words, gu_scale, gu_zero, act, act_q, dn_words, dn_scale, dn_zero, out, bar,
                     gu_rows, gu_gpad, dn_rows, dn_gpad, gu_iters, dn_per, dn_iters,
                     H: tl.constexpr, I: tl.constexpr, GU_BN: tl.constexpr, GU_R: tl.constexpr,
                     GU_GR: tl.constexpr, DN_BN: tl.constexpr, DN_R: tl.constexpr, DN_GR: tl.constexpr,
                     T: tl.constexpr, GU_EVICT: tl.constexpr, DN_EVICT: tl.constexpr, GLU: tl.constexpr,
                     SYNC: tl.constexpr, PDL: tl.constexpr):
    """Program p: gate/up tile p (x read after the PDL wait), then down unit p (column tile p % tiles,
    k-split p // tiles), its first weights requested before the barrier."""
    pid = tl.program_id(0)
    if pid < (2 * I) // GU_BN:  # one gate/up tile a program (the grid holds them all: main() checks)
        _segment(pid, 0, 0, gu_iters, 1, 0, xq, gu_words, gu_scale, gu_zero, gu_scale, act, act, bar,
                 1, 2 * I, H // 4, 0, 0, gu_rows, gu_gpad,
                 4, False, False, GU_GR, T, 1, GU_BN, GU_R, False, False, GU_EVICT, True, 1, 1,
                 PDL, GLU, False, False, False, True)
    dn_tiles = H // DN_BN
    it0 = (pid // dn_tiles) * dn_per
    it1 = tl.minimum(it0 + dn_per, dn_iters)
    # 3: grid_sync after the first weights; 4: no barrier (the bound, wrong sums)
    _segment(pid % dn_tiles, 0, it0, it1, 1, 0, act_q, dn_words, dn_scale, dn_zero, dn_scale, out, out, bar,
             1, H, I // 4, 0, 0, dn_rows, dn_gpad,
             4, False, False, DN_GR, T, 1, DN_BN, DN_R, False, True, DN_EVICT, True, 1, 1,
             3 if SYNC else 4, 0, True, False, False, True)
    if PDL:
        launch_dependents()


def capacity(kernel, num_warps: int) -> int:
    """Programs of ``kernel`` resident per SM: registers (allocated per warp in units of 256), the
    shared memory, the 32 programs and 64 warps an SM holds."""
    regs = -(-kernel.n_regs * 32 // 256) * 256 * num_warps
    smem = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem // max(kernel.metadata.shared, 1) if kernel.metadata.shared else 32
    return min(65536 // regs, by_smem, 32, 64 // num_warps)


class Layer:
    def __init__(self, gen):
        self.gu = _random_qlinear(H, 2 * I, 4, 128, False, 16, "cuda", gen, glu=GLU_BLOCK)
        self.dn = _random_qlinear(I, H, 4, 128, False, 16, "cuda", gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28, help="distinct layers in the graph (L2-cold weights)")
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--maxnreg", type=int, default=80, help="register cap of the persistent kernel (0: none, which "
                    "compiles to 64 registers, 8 programs per SM: the barrier then costs 5.6 µs, run 15)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [Layer(gen) for _ in range(args.layers)]
    x = torch.randn(1, H, generator=gen, device="cuda").half() * 0.5
    act = torch.empty(1, I, dtype=torch.float16, device="cuda")
    outs = torch.zeros(args.layers, 1, H, dtype=torch.float32, device="cuda")
    bar = torch.zeros(2, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pw0, dw0 = layers[0].gu.packed, layers[0].dn.packed
    gu_r = min(GU.R, pw0.group_rows)
    gu_iters = H // pw0.group_size * (pw0.group_rows // gu_r)
    dn_iters = (I // dw0.plan.values_per_row) // DOWN.R  # wide: R spans whole 128-k blocks

    def chain(lay: Layer, out: torch.Tensor, sync: bool, grid: int, per: int, pdl: int):
        pw, dw = lay.gu.packed, lay.dn.packed
        return mlp_chain_kernel[(grid,)](
            x.view(torch.int64), pw.words, pw.scale, pw.zero, act, act.view(torch.int64), dw.words, dw.scale,
            dw.zero, out, bar, pw.rows, pw.scale.shape[1], dw.rows, dw.scale.shape[1], gu_iters, per, dn_iters,
            H=H, I=I, GU_BN=GU.BN, GU_R=gu_r, GU_GR=pw.group_rows, DN_BN=DOWN.BN, DN_R=DOWN.R,
            DN_GR=dw.group_rows, T=pw.tile, GU_EVICT=GU.evict, DN_EVICT=DOWN.evict, GLU=GLU_BLOCK, SYNC=sync,
            PDL=pdl, num_warps=4, **({"maxnreg": args.maxnreg} if args.maxnreg else {}), **launch_kwargs(pdl))

    # size the grid: compile once (and run correctly: the gate/up tiles past the grid are skipped, so the
    # result is not used) with a grid every GPU holds, one program per down tile and a single k-split
    k = chain(layers[0], outs[0], True, H // DOWN.BN, dn_iters, 0)
    torch.cuda.synchronize()
    per_sm = capacity(k, 4)
    want = per_sm * sms // (H // DOWN.BN)
    per = -(-dn_iters // want)
    splits = -(-dn_iters // per)
    grid = splits * (H // DOWN.BN)
    if grid > per_sm * sms:
        raise SystemExit(f"grid {grid} over the {per_sm * sms} resident programs")
    if grid < 2 * I // GU.BN:
        raise SystemExit(f"grid {grid} under the {2 * I // GU.BN} gate/up tiles: raise --maxnreg's programs per SM")
    print(f"{torch.cuda.get_device_name()}; {args.layers} layers of W4 g128 gate/up {H}->{2 * I} (silu-mul) "
          f"+ down {I}->{H}; chain kernel {k.n_regs} registers, {per_sm} programs/SM -> grid {grid} "
          f"(down: {H // DOWN.BN} tiles x {splits} splits of {per} iterations)")

    def two_launches(lay, out, down=DOWN):
        a = gemv(x, lay.gu.packed, cfg=GU, glu=GLU_BLOCK, out=act)
        gemv(a, lay.dn.packed, cfg=down, out=out, accumulate=True)

    same = replace(DOWN, split=splits)
    variants = {
        "two launches (PDL)": lambda i: two_launches(layers[i], outs[i]),
        f"two launches (PDL), down in {splits} splits": lambda i: two_launches(layers[i], outs[i], same),
        "one launch, grid barrier": lambda i: chain(layers[i], outs[i], True, grid, per, 1),
        "one launch, no barrier (bound, wrong sums)": lambda i: chain(layers[i], outs[i], False, grid, per, 1),
    }
    # correctness of the barrier: the chain's outputs against the two launches' (fp32 atomics: order only)
    with torch.no_grad(), programmatic_launch(True):
        outs.zero_()
        for i in range(args.layers):
            two_launches(layers[i], outs[i])
        ref = outs.clone()
        outs.zero_()
        for i in range(args.layers):
            chain(layers[i], outs[i], True, grid, per, 1)
        torch.cuda.synchronize()
        err = ((outs - ref).abs().max() / ref.abs().max()).item()
        print(f"grid barrier vs two launches: max |diff| / max |ref| = {err:.2e}")
        if not err < 1e-4:
            raise SystemExit("the persistent launch does not reproduce the two launches")
        graphs = {}
        stream = torch.cuda.Stream()
        for name, fn in variants.items():
            for i in range(args.layers):
                fn(i)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                outs.zero_()
                for i in range(args.layers):
                    fn(i)
            graphs[name] = (g, fn)
        times = {name: [] for name in graphs}
        for _ in range(args.rounds):  # interleaved rounds: the clocks drift between them
            for name, (g, _) in graphs.items():
                g.replay()
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(args.reps):
                    g.replay()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b) * 1000 / args.reps / args.layers)
    base = sorted(times["two launches (PDL)"])[len(times["two launches (PDL)"]) // 2]
    for name, ts in times.items():
        ts = sorted(ts)
        med = ts[len(ts) // 2]
        print(f"  {name:44s} {med:7.2f} µs / layer (rounds {ts[0]:.2f}-{ts[-1]:.2f})  {med - base:+6.2f}")


if __name__ == "__main__":
    main()
