"""The method ranking on the built-in trained VLM: accuracy and fidelity of every recipe.

For each model (the shipped built-in model and its fp-identical outlier variant) and each recipe,
runs the real quantize job (local Ray, CPU), loads the checkpoint it wrote, and scores built-in
visual QA on the test split (teacher-forced exact match, which equals greedy decoding), next to
the job's own held-out fidelity (KL, top-1 agreement on answer tokens).

    python benchmarks/methods/accuracy_table.py --out benchmarks/methods/results [--n 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RECIPES = [
    ("fp", None),
    ("RTN W4 g128", dict(method="rtn", wbits=4, group_size=128)),
    ("AWQ W4 g128", dict(method="awq", wbits=4, group_size=128)),
    ("MBQ W4 g128", dict(method="mbq", wbits=4, group_size=128)),
    ("RTN W3 g128", dict(method="rtn", wbits=3, group_size=128)),
    ("AWQ W3 g128 no-clip", dict(method="awq", wbits=3, group_size=128, clip=False)),
    ("AWQ W3 g128", dict(method="awq", wbits=3, group_size=128)),
    ("MBQ W3 g128 no-clip", dict(method="mbq", wbits=3, group_size=128, clip=False)),
    ("MBQ W3 g128", dict(method="mbq", wbits=3, group_size=128)),
    ("MBQ W3 g128 clip unweighted", dict(method="mbq", wbits=3, group_size=128, mbq_clip_weighting=False)),
    ("MBQ W3 g128 floor=none", dict(method="mbq", wbits=3, group_size=128, sensitivity_floor="none")),
    ("MBQ W3 g128 mse", dict(method="mbq", wbits=3, group_size=128, loss="mse")),
    ("RTN W4A8", dict(method="rtn", wbits=4, abits=8)),
    ("SmoothQuant W4A8", dict(method="smoothquant", wbits=4, abits=8)),
    ("AWQ W4A8", dict(method="awq", wbits=4, abits=8)),
    ("MBQ W4A8", dict(method="mbq", wbits=4, abits=8)),
]


# issue 5's ablation: each Q-VLM part added in turn, next to AWQ and MBQ (same bits)
QVLM_ABLATION = [
    ("fp", None),
    ("AWQ W3 g128", dict(method="awq", wbits=3, group_size=128)),
    ("MBQ W3 g128", dict(method="mbq", wbits=3, group_size=128)),
    ("Q-VLM W3 fixed blocks", dict(method="qvlm", wbits=3, group_size=128, partition="fixed")),
    ("Q-VLM W3 + entropy partition", dict(method="qvlm", wbits=3, group_size=128, partition="entropy")),
    ("Q-VLM W3 + dependency partition", dict(method="qvlm", wbits=3, group_size=128, partition="dependency")),
    ("Q-VLM W3 + entropy + VEO", dict(method="qvlm", wbits=3, group_size=128, partition="entropy", veo=True)),
    ("Q-VLM+MBQ W3 (entropy)", dict(method="qvlm+mbq", wbits=3, group_size=128, partition="entropy")),
    ("AWQ W4A8", dict(method="awq", wbits=4, abits=8)),
    ("MBQ W4A8", dict(method="mbq", wbits=4, abits=8)),
    ("Q-VLM W4A8 fixed blocks", dict(method="qvlm", wbits=4, abits=8, partition="fixed")),
    ("Q-VLM W4A8 + entropy partition", dict(method="qvlm", wbits=4, abits=8, partition="entropy")),
    ("Q-VLM+MBQ W4A8 (entropy)", dict(method="qvlm+mbq", wbits=4, abits=8, partition="entropy")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/methods/results")
    ap.add_argument("--n", type=int, default=1000, help="test questions")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples")
    ap.add_argument("--models", nargs="+", default=["builtin", "builtin-outlier"])
    ap.add_argument("--quick", action="store_true", help="a few recipes only")
    ap.add_argument("--only", nargs="+", metavar="LABEL", help="just these recipe labels (tables of one run)")
    ap.add_argument("--ablation", choices=("methods", "qvlm"), default="methods",
                    help="methods: RTN/AWQ/MBQ/SmoothQuant variants; qvlm: issue 5's Q-VLM ablation")
    args = ap.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    from pipeline.checkpoint.loader import load_quantized_model
    from pipeline.config import spec_from_dict
    from pipeline.data import synthetic
    from pipeline.distributed.job import run_quantize
    from pipeline.distributed.models import resolve_model
    from pipeline.distributed.progress import JobView
    from pipeline.evaluate.vqa import teacher_forced_accuracy
    from pipeline.models import detect_adapter
    from pipeline.models.loading import build_model
    from pipeline.models.processors import load_processor
    from pipeline.models.weights import open_source

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    test = synthetic.generate("test", args.n, seed=0)
    recipes = QVLM_ABLATION if args.ablation == "qvlm" else RECIPES
    if args.quick:
        recipes = recipes[:6]
    if args.only:
        unknown = sorted(set(args.only) - {label for label, _ in recipes})
        if unknown:
            ap.error(f"unknown recipe labels {unknown}; known: {[label for label, _ in recipes]}")
        recipes = [(label, r) for label, r in recipes if label in args.only]
    rows = []
    for model in args.models:
        ref = resolve_model(model, out)
        processor = load_processor(ref)
        for label, recipe in recipes:
            t0 = time.perf_counter()
            if recipe is None:
                src = open_source(ref)
                m = build_model(src, detect_adapter(src.config_dict), dtype=torch.float32)
                fid = {}
            else:
                spec = spec_from_dict({"model": model, "out": str(out / "ckpt"), "overwrite": True,
                                       "calib": {"source": "builtin", "num_samples": args.calib, "holdout": 8},
                                       "recipe": recipe, "resources": {"device": "cpu"}})
                res = run_quantize(spec, JobView(quiet=True))
                fid = res.report["fidelity"]["answer"]
                m = load_quantized_model(res.out, dtype=torch.float32)
            acc = teacher_forced_accuracy(m, processor, test, batch_size=100)
            stages = res.report["stages_s"] if recipe is not None else {}
            row = {"model": model, "recipe": label, "accuracy": acc["accuracy"], "per_skill": acc["per_skill"],
                   "kl": fid.get("kl"), "top1": fid.get("top1"), "seconds": time.perf_counter() - t0,
                   "search_s": stages.get("capture + search"), "veo_s": stages.get("veo")}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_skill"}), flush=True)
            (out / f"{args.ablation}_table{'_only' if args.only else ''}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| recipe | " + " | ".join(f"{m} acc % | {m} KL | {m} top-1 % | capture+search s" for m in args.models)
             + " |", "|---|" + "---|---|---|---|" * len(args.models)]
    for label, _ in recipes:
        cells = []
        for model in args.models:
            r = next(x for x in rows if x["model"] == model and x["recipe"] == label)
            kl = "—" if r["kl"] is None else f"{r['kl']:.4f}"
            t1 = "—" if r["top1"] is None else f"{100 * r['top1']:.1f}"
            ts = "—" if r.get("search_s") is None else f"{r['search_s']:.0f}"
            cells.append(f"{100 * r['accuracy']:.1f} | {kl} | {t1} | {ts}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (out / f"{args.ablation}_table{'_only' if args.only else ''}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
