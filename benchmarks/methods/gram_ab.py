"""AWQ's scale search with the squared-error loss in its direct form vs through the inputs' Gram
matrix (`ScaleOptions.gram`), on one Llama-shaped layer with planted outliers: wall time of the
"scales" phase (the alpha grid) and the choices made, side by side in one run.

    python benchmarks/methods/gram_ab.py [--hidden 1024 --inter 2816 --samples 32 --tokens 256] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.quant.awq import search_awq
from pipeline.quant.types import BlockCalib, SearchSettings
from pipeline.models.base import LLAMA_LIKE_GROUPS
from pipeline.quant.quantizer import QuantScheme


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2816)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--clip", action="store_true", help="with the clip search (its Gram-block form too)")
    a = p.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "quant"))
    from scale_layers import decoder_layer, samples

    dtype = getattr(torch, a.dtype)
    layer, cfg = decoder_layer("llama", seed=1, dtype=dtype, outliers=4, hidden=a.hidden, inter=a.inter,
                               heads=a.heads, kv_heads=a.heads)
    layer = layer.to(a.device)
    smps = samples(cfg, n=a.samples, tokens=a.tokens, seed=2, dtype=dtype)  # the search moves them to its device
    out = {}
    for rep in range(a.reps):
        for gram in (False, None):
            st = SearchSettings(scheme=QuantScheme(4, 128, False), groups=LLAMA_LIKE_GROUPS, scale_dtype=dtype,
                                abits=16, options={"clip": a.clip, "gram": gram}, device=a.device)
            t0 = time.perf_counter()
            res = search_awq([layer], [0], BlockCalib(smps), st)
            wall = time.perf_counter() - t0
            m = res.metrics["layers"]["0"]
            out.setdefault(gram, []).append((wall, m["time_s"]["scales"], {g.name: m[g.name].get("alpha") for g in LLAMA_LIKE_GROUPS},
                                             m["time_s"]["clip"], res))
    for gram, runs in out.items():
        label = "direct" if gram is False else "gram (auto)"
        print(f"{label:12s} scales phase {[round(r[1], 2) for r in runs]} s, clip phase {[round(r[3], 2) for r in runs]} s, "
              f"whole search {[round(r[0], 2) for r in runs]} s, alphas {runs[-1][2]}")
    d, g = min(r[1] for r in out[False]), min(r[1] for r in out[None])
    print(f"scales phase: direct {d:.2f}s, gram {g:.2f}s -> {d / g:.2f}x; same alphas: {out[False][-1][2] == out[None][-1][2]}")
    if a.clip:
        dc, gc = min(r[3] for r in out[False]), min(r[3] for r in out[None])
        rd, rg = out[False][-1][4], out[None][-1][4]
        same = all(torch.equal(q.qweight, rg.quantized[k].qweight) for k, q in rd.quantized.items())
        print(f"clip phase: direct {dc:.2f}s, gram blocks {gc:.2f}s -> {dc / gc:.2f}x; identical codes: {same}")


if __name__ == "__main__":
    main()
