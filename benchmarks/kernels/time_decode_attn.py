"""Run 15: the decode step's attention launch at other cache-block sizes, split counts and warps, timed
in the batch-1 W4 step itself (one process, the same model, interleaved rounds).

Why: run 14's what-if put the attention at 8.4 µs a layer of the W4 step, and its launch shape
(32-position blocks over up to 8 splits, 2 warps) was chosen standalone in run 8. At the bench's
context (128-256 positions) that is 5-9 splits of one block each, merged through the workspace by
the last to arrive: two extra dependent round trips that fewer, longer splits avoid.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_decode_attn.py [--variant w4] [--rounds 3] [--contexts 128 2048]

Outcome, first call (`runs/run15_decodeattn.log`, context 128, splits=1 meaning no merge): 128-position
blocks in one split, 8 warps, 2.256 ms a step against 2.289 for 32-position blocks over 8 splits (-1.2 µs
a layer); every shape that still merged was 0.5-0.7 µs a layer slower than the old launch.
Second call (`runs/run15_decodeattn2.log`, with ``split_from``): 128-position blocks, one split below
512 positions, 4 warps: -3.1 µs a layer at context 128 and -5.8 at 2048 (8 warps -3.3 / -4.6; one
split at any length +8.2 at 2048). That launch is now ``rope_attention``'s default.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

import kernels.decode_ops as ops  # noqa: E402
from pipeline.evaluate.bench_decode import DecodeModel, config_for, parse_variant, time_steps  # noqa: E402

STEPS = 128
# (cache block, splits, warps, split_from); the first is run 8-14's launch, the second today's default
SHAPES = [(32, 8, 2, 0), (128, 8, 8, 512), (128, 8, 4, 512), (64, 8, 4, 512), (128, 1, 8, 0), (64, 8, 2, 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="w4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    args = ap.parse_args()
    parse_variant(args.variant)
    bits = int(args.variant[1]) if args.variant != "fp16" else None
    model = DecodeModel(config_for(False), args.variant, 1, max(args.contexts) + STEPS + 8, "cuda",
                        128 if bits else None)
    model.fill_cache(max(args.contexts), torch.Generator(device="cuda").manual_seed(1))
    orig = ops.rope_attention
    for context in args.contexts:
        print(f"{torch.cuda.get_device_name()}; {args.variant}, batch 1, context {context}, {STEPS} steps, PDL on")
        times: dict[tuple, list[float]] = {s: [] for s in SHAPES}
        try:
            for _ in range(args.rounds):
                for bl, ns, w, sf in SHAPES:
                    ops.rope_attention = functools.partial(orig, block=bl, splits=ns, num_warps=w, split_from=sf)
                    times[(bl, ns, w, sf)].append(time_steps(model, context, STEPS)[0])
        finally:
            ops.rope_attention = orig
        base = sorted(times[SHAPES[0]])[len(times[SHAPES[0]]) // 2]
        for (bl, ns, w, sf), ts in times.items():
            ts = sorted(ts)
            med = ts[len(ts) // 2]
            print(f"  block {bl:3d} splits {ns} warps {w} split_from {sf:3d}: {med:.3f} ms/step "
                  f"(rounds {ts[0]:.3f}-{ts[-1]:.3f})  {(med - base) * 1000 / 28:+5.2f} µs/layer")


if __name__ == "__main__":
    main()
