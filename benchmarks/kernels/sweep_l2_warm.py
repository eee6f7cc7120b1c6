"""Run 14: the batch-1 decode step with different L2 warm-up budgets, side by side in one process (each model
built once, so every setting runs the same autotuner choices), two rounds, fp16 / W4 / W3. GPU only.

    PYTHONPATH=$PWD python3 benchmarks/kernels/sweep_l2_warm.py --settings 0,0 16,4 24,8 32,8 --out out/warm
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main() -> int:
    from pipeline.evaluate.bench_decode import DecodeModel, config_for, time_steps

    p = argparse.ArgumentParser()
    p.add_argument("--settings", nargs="+", default=["0,0", "16,4", "24,8", "32,8"], help="ATTN_MB,NORM_MB pairs")
    p.add_argument("--variants", nargs="+", default=["fp16", "w4", "w3"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--out", default="warm-sweep")
    a = p.parse_args()
    import torch

    config = config_for(False)
    settings = [tuple(float(x) for x in s.split(",")) for s in a.settings]
    models = {}
    for v in a.variants:  # each built once; only the warm plan changes between settings
        m = DecodeModel(config, v, 1, 128 + a.steps + 8, "cuda", 128)
        m.fill_cache(128, torch.Generator(device="cuda").manual_seed(1))
        models[v] = m
    rows = []
    for rnd in range(a.rounds):
        for mb in settings:
            for v, m in models.items():
                m._plan_l2_warm(*mb)
                m.pos.fill_(128)
                ms, _ = time_steps(m, 128, a.steps)
                rows.append({"variant": v, "l2_warm_mb": list(mb), "round": rnd, "ms_per_step": ms})
                print(f"round {rnd} {v:5} warm {mb[0]:g}/{mb[1]:g} MB: {ms:.3f} ms/step", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "warm.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| setting (attn / norm MB) | " + " | ".join(f"{v} ms" for v in a.variants) + " | "
          + " | ".join(f"{v} x fp16" for v in a.variants if v != "fp16") + " |")
    for mb in settings:
        best = {v: min(r["ms_per_step"] for r in rows if r["variant"] == v and tuple(r["l2_warm_mb"]) == mb)
                for v in a.variants}
        base = min(r["ms_per_step"] for r in rows if r["variant"] == "fp16" and r["l2_warm_mb"] == [0.0, 0.0]) \
            if "fp16" in a.variants and (0.0, 0.0) in settings else None
        print(f"| {mb[0]:g} / {mb[1]:g} | " + " | ".join(f"{best[v]:.3f}" for v in a.variants) + " | "
              + " | ".join(f"{base / best[v]:.2f}" if base else "" for v in a.variants if v != "fp16") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
