"""Entropy profile -> partition -> figure, end to end on the toy stack of ``bench_blocks.py``.

Feeds the accumulators the way the capture wavefront does (``acc[i].update(h_in, h_out)`` per
sample, one accumulator per layer per sample group, merged), prints the scores and the blocks of
every mode, and saves the partition figures.

    .venv/bin/python benchmarks/qvlm/bench_profile.py --out /tmp/qvlm_profile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_blocks import make_stack  # noqa: E402

from pipeline.quant.entropy import EntropyAccumulator, EntropyProfile  # noqa: E402
from pipeline.quant.partition import partition, plot_partition, quantile_threshold  # noqa: E402
from pipeline.quant.qvlm import run_block  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--groups", type=int, default=2, help="sample groups (capture workers) to merge")
    ap.add_argument("--abits", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--max-block-layers", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers, samples = make_stack(args.layers, args.hidden, args.samples, 64)
    bits = args.abits if args.abits < 16 else 8
    per_group = [[EntropyAccumulator(bits=bits, max_tokens=512) for _ in layers] for _ in range(args.groups)]
    with torch.no_grad():
        for j, s in enumerate(samples):
            accs = per_group[j % args.groups]
            h = s.hidden
            for i, layer in enumerate(layers):
                out = run_block([layer], h, s.layer_kwargs) if i + 1 < len(layers) else None
                accs[i].update(h, out)
                h = out
    merged = [EntropyAccumulator.from_dict(json.loads(json.dumps(per_group[0][i].to_dict()))) for i in range(len(layers))]
    for g in per_group[1:]:
        merged = [m.merge(a) for m, a in zip(merged, g)]
    prof = EntropyProfile.from_accumulators(merged)
    print("entropy   ", " ".join(f"{v:.3f}" for v in prof.entropies()))
    print("dependency", " ".join(f"{v:.3f}" for v in prof.dependencies()))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for mode in ("entropy", "dependency", "fixed"):
        scores = prof.scores(mode)
        blocks = partition(scores, args.p, args.max_block_layers, mode)
        tau = quantile_threshold(scores, args.p) if mode != "fixed" else None
        print(f"{mode:10s} tau={tau if tau is None else round(tau, 4)} blocks={blocks}")
        if out:
            fig = plot_partition(scores if mode != "fixed" else prof.entropies(), blocks, tau, title=f"toy, {mode}")
            fig.savefig(out / f"partition_{mode}.png", dpi=100)


if __name__ == "__main__":
    main()
