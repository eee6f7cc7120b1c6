"""Run 14: the batch-1 decode step with the autotuner's launch for some projections replaced by a given
candidate, side by side in one process (the same model, the other picks unchanged), interleaved rounds.

Why: the autotuner times each candidate behind a short PDL RMSNorm, but the o_proj runs behind the
attention (~8 µs), during which a launch that requests all its weights before the PDL wait (depth 2,
``gemv_h2``) could have them in flight. This measures that directly in the step.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_decode_picks.py

Outcome (run 14, `runs/run14_decodepicks.log`): within -0.6% / +2.6% (W4) and +0.8% / +10% (W3) of the
autotuned step, so the wide depth-2 candidates were dropped from the dispatcher afterwards; a forced name
that is no longer offered is tuned as usual (``autotune.preload``), so this script then re-times the
autotuner's own pick under that label.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from kernels import autotune  # noqa: E402
from pipeline.evaluate.bench_decode import DecodeModel, config_for, time_steps  # noqa: E402

CONTEXT, STEPS = 128, 128
SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "down": (18944, 3584)}  # (K, N), accumulate launches


def step_ms(model: DecodeModel) -> float:
    return time_steps(model, CONTEXT, STEPS)[0]  # its eager steps pick (or re-pick) every launch


def force(bits: int, names: dict[str, str]) -> dict:
    """Replace the decisions for the named projections (by shape) with the given candidates; return
    what was there, for ``restore``."""
    saved = {}
    for key in list(autotune._BEST):
        for proj, name in names.items():
            k, n = SHAPES[proj]
            if key[0] == "a16" and key[1] == bits and key[6] == n and key[7] == k and key[10]:
                saved[key] = (autotune._BEST.pop(key), autotune._NAME.pop(key))
                autotune._PRELOAD[autotune.key_string(key)] = name
    return saved


def restore(saved: dict) -> None:
    for key, (fn, name) in saved.items():
        autotune._BEST[key], autotune._NAME[key] = fn, name
        autotune._PRELOAD.pop(autotune.key_string(key), None)


def main() -> None:
    config = config_for(False)
    print(f"{torch.cuda.get_device_name()}; batch 1, context {CONTEXT}, {STEPS} steps, PDL on")
    for variant, bits in (("w4", 4), ("w3", 3)):
        model = DecodeModel(config, variant, 1, CONTEXT + STEPS + 8, "cuda", 128)
        model.fill_cache(CONTEXT, torch.Generator(device="cuda").manual_seed(1))
        base = step_ms(model)
        picks = {p: n for key, n in autotune.chosen().items() for p, (k, nn) in SHAPES.items()
                 if key[0] == "a16" and key[1] == bits and key[6] == nn and key[7] == k and key[10]}
        print(f"{variant} autotuned: {base:.3f} ms  {picks}", flush=True)
        d2 = "h2 BN32 R32 w4 x5 nc256 wide d2" if bits == 4 else "h2 BN32 R16 w4 x4 wide d2"
        bn64 = f"h2 BN64 R{16 if bits == 4 else 4} w4 x4 d2"
        trials = {"o wide d2": {"o": d2}, "qkv wide d2": {"qkv": d2}, "o+qkv wide d2": {"o": d2, "qkv": d2},
                  "o+qkv+down wide d2": {"o": d2, "qkv": d2, "down": d2}, "o+qkv BN64 d2": {"o": bn64, "qkv": bn64}}
        rows = {"autotuned": [base]}
        for _ in range(2):
            for label, names in trials.items():
                saved = force(bits, names)
                try:
                    ms = step_ms(model)
                    got = {p: autotune.choice(k) for k in autotune._BEST for p, (kk, nn) in SHAPES.items()
                           if p in names and k[0] == "a16" and k[1] == bits and k[6] == nn and k[7] == kk and k[10]}
                    rows.setdefault(label, []).append(ms)
                    print(f"  {variant} {label}: {ms:.3f} ms  {got}", flush=True)
                finally:
                    for key in list(autotune._BEST):
                        if key in saved:
                            autotune._BEST.pop(key)
                            autotune._NAME.pop(key, None)
                    restore(saved)
            rows["autotuned"].append(step_ms(model))
            print(f"  {variant} autotuned again: {rows['autotuned'][-1]:.3f} ms", flush=True)
        for label, v in rows.items():
            print(f"{variant} {label:22s} best {min(v):.3f} ms  (all: {' '.join(f'{x:.3f}' for x in v)})")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
