"""Run 11: the autotuner's agreement check rejected "gemm trans BM256 BN128 BK64 w8" with a NaN
error on 1000x2048 at M=300 (2 of 8 GPU test cases). NaN means an output element never written
(poisoned here), so: is a tile's split-K "last program" skipped? Each variant is run many times
into a NaN-filled output; after each run the shared workspace must be clean (zero counters/sums).

Usage (GPU): PYTHONPATH=$PWD python3 benchmarks/kernels/repro_splitk.py [--reps 40]
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, "tests/kernels")
from kt_helpers import random_qweight  # noqa: E402

from kernels import dispatch  # noqa: E402
from kernels.layout import pack  # noqa: E402
from kernels.tuning import GemmConfig  # noqa: E402

VARIANTS = {
    "trans BM256 w8 s3 auto-split": dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=3, trans=True),
    "trans BM256 w8 s3 split1": dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=3, trans=True, split=1),
    "trans BM256 w8 s2 auto-split": dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=2, trans=True),
    "trans BM128 w8 s3 auto-split": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3, trans=True),
    "BM256 w8 s3 auto-split (not trans)": dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=3),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=40)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    for bits, group, dtype in ((4, 128, torch.float16), (2, 64, torch.bfloat16), (3, 128, torch.float16)):
        qw = random_qweight(1000, 2048, bits, group, False, dtype, g)
        pw = pack(qw, device="cuda")
        for m in (300, 512):
            x = (torch.randn(m, 2048, generator=g) * 2).to(dtype).cuda()
            ref = dispatch.gemm_dequant(x, pw).float()
            bound = 2e-2 * float(ref.abs().max())
            for name, kw in VARIANTS.items():
                cfg = GemmConfig(**{**kw, "BK": 32 if bits == 3 else kw["BK"]})
                nan_runs, worst, dirty = 0, 0.0, 0
                for _ in range(a.reps):
                    out = torch.full((m, 1000), float("nan"), dtype=dtype, device="cuda")
                    y = dispatch.gemm(x, pw, out=out, cfg=cfg).float()
                    torch.cuda.synchronize()
                    nan_runs += int(torch.isnan(y).any())
                    worst = max(worst, float(torch.nan_to_num((y - ref).abs(), nan=float("inf")).max()))
                    dirty += bool(dispatch.dirty_workspaces(reset=True))
                tiles = -(-m // cfg.BM) * -(-1000 // cfg.BN)
                split, _ = dispatch.gemm_split(cfg, tiles, pw.k_pad // cfg.BK, x.device)  # as launched (after run 11's fix)
                verdict = "OK" if nan_runs == 0 and dirty == 0 and worst <= bound else "BAD"
                print(f"W{bits} g{group} {str(dtype)[6:]:8s} M={m:4d} {name:36s} split={split:2d}  NaN runs {nan_runs:3d}/{a.reps}"
                      f"  dirty {dirty:3d}  worst err {worst:.3g} (bound {bound:.3g})  {verdict}", flush=True)


if __name__ == "__main__":
    main()
