"""`vlmq demo`: quantize the built-in VLM on CPU, validate the checkpoint, show what it cost.

Runs the same job a user would (`vlmq quantize --model builtin --calib builtin --wbits 4`), then,
when the built-in model is the trained one, its visual-QA accuracy before and after.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .config import CalibSpec, JobSpec, QuantRecipe, Resources


def demo_spec(out: str, quick: bool = False) -> JobSpec:
    return JobSpec(
        model="builtin",
        out=out,
        calib=CalibSpec(source="builtin", num_samples=16 if quick else 64, holdout=4 if quick else 8),
        recipe=QuantRecipe(method="rtn", wbits=4, group_size=128),
        resources=Resources(device="cpu"),
        overwrite=True,
    )


def run_demo(out: str = "demo-out", quick: bool = False) -> int:
    from .distributed.job import run_quantize
    from .evaluate.summary import print_summary

    spec = demo_spec(out, quick)
    if Path(out).exists() and not (Path(out) / "manifest.json").exists() and any(Path(out).iterdir()):
        # never clobber a folder that is not one of our checkpoints
        from .errors import VlmqError

        raise VlmqError(f"{out} exists and is not a vlmq checkpoint", "remove it or pass --out to another folder")
    result = run_quantize(spec)
    acc = accuracy_before_after(result.report["model"], out, n=32 if quick else 100)
    if acc:
        result.report["accuracy"] = acc
    print_summary(result)
    if not spec.keep_work:
        shutil.rmtree(spec.work_path, ignore_errors=True)
    return 0


def accuracy_before_after(model_dir: str, ckpt: str, n: int) -> dict[str, str] | None:
    """Built-in visual-QA accuracy of the fp model and of the checkpoint (trained model only)."""
    from .models.builtin import BUILTIN_DIR, builtin_available

    if not builtin_available() or Path(model_dir).resolve() != Path(BUILTIN_DIR).resolve():
        return None
    from .checkpoint.loader import load_quantized_model
    from .evaluate.vqa import evaluate_builtin_vqa
    from .models import detect_adapter
    from .models.loading import build_model
    from .models.processors import load_processor
    from .models.weights import open_source

    processor = load_processor(model_dir)
    source = open_source(model_dir)
    t0 = time.perf_counter()
    fp = build_model(source, detect_adapter(source.config_dict))
    fp_acc = evaluate_builtin_vqa(fp, processor, n=n)["accuracy"]
    del fp
    q = load_quantized_model(ckpt)
    q_acc = evaluate_builtin_vqa(q, processor, n=n)["accuracy"]
    dt = time.perf_counter() - t0
    return {"builtin-vqa fp": f"{100 * fp_acc:.1f}% ({n} test questions)",
            "builtin-vqa quantized": f"{100 * q_acc:.1f}% ({100 * (q_acc - fp_acc):+.1f} points; eval {dt:.0f}s)"}
