"""VEO on a tiny random LLaVA (W2 g32 RTN language model): KL to fp on answer tokens and the
vision-token entropy before/after, for several eta and parameter sets, plus the vision tokens'
absmax/RMS ratio (how outlier-heavy the projector output is: the per-token-grid entropy falls
when one channel dominates a token, which is the wrong direction for quantization).

    .venv/bin/python benchmarks/qvlm/bench_veo.py [--steps 50 --lr 1e-3]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.models.builtin import rtn_fake_quant_  # noqa: E402
from pipeline.models.families import LLAVA  # noqa: E402
from pipeline.models.tiny import build_tiny_model  # noqa: E402
from pipeline.quant.veo import optimize_projector  # noqa: E402


def inputs_for(model, n: int, seed: int):
    img = model.config.image_token_id
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, 300, (1, 40), generator=g)
        ids[0, 2:18] = img
        labels = torch.full((1, 40), -100)
        labels[0, 30:] = ids[0, 30:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(1, 3, 28, 28, generator=g), "labels": labels,
                    "vision_mask": ids[0] == img})
    return out


@torch.no_grad()
def peakiness(model, new: dict, inputs) -> float:
    """Mean over vision tokens of absmax / RMS of the projector output (with ``new`` loaded)."""
    m = copy.deepcopy(model)
    sd = m.state_dict()
    for k, v in new.items():
        sd[k].copy_(v)
    vals = []
    for inp in inputs:
        f = m.model.get_image_features(pixel_values=inp["pixel_values"])
        f = f.pooler_output if hasattr(f, "pooler_output") else f
        f = torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
        f = f.reshape(-1, f.shape[-1]).float()
        vals.append((f.abs().amax(-1) / f.square().mean(-1).sqrt()).mean())
    return float(torch.stack(vals).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fp, _ = build_tiny_model("llava", seed=0)
    q = copy.deepcopy(fp)
    rtn_fake_quant_(q, 2, 32)
    train, held = inputs_for(fp, args.train, 0), inputs_for(fp, args.heldout, 1)
    base = {k: v.clone() for k, v in q.state_dict().items() if k.startswith(LLAVA.projector_path)}
    print(f"tiny LLaVA, LM W2 g32 RTN, {args.train} train / {args.heldout} held-out inputs, {args.steps} steps, lr {args.lr}")
    print("| params | eta | KL train before -> after | KL held-out before -> after | H_vis before -> after | absmax/RMS before -> after |")
    print("|---|---|---|---|---|---|")
    for params in ("affine", "all"):
        for eta in (0.0, 0.001, 0.01, 0.05):
            opts = {"steps": args.steps, "lr": args.lr, "eta": eta, "params": params, "batch_size": 2}
            new, log = optimize_projector(fp, q, train, LLAVA.projector_path, LLAVA.layers_path, opts)
            q2 = copy.deepcopy(q)
            sd = q2.state_dict()
            for k, v in new.items():
                sd[k].copy_(v)
            _, hb = optimize_projector(fp, q, held, LLAVA.projector_path, LLAVA.layers_path, {"steps": 0})
            _, ha = optimize_projector(fp, q2, held, LLAVA.projector_path, LLAVA.layers_path, {"steps": 0})
            b, a = log["before"], log["after"]
            print(f"| {params} | {eta} | {b['kl']:.4g} -> {a['kl']:.4g} | {hb['before']['kl']:.4g} -> "
                  f"{ha['before']['kl']:.4g} | {b['entropy']:.3f} -> {a['entropy']:.3f} | "
                  f"{peakiness(q, base, train):.2f} -> {peakiness(q, new, train):.2f} |", flush=True)


if __name__ == "__main__":
    main()
