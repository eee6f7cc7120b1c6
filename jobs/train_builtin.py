"""Train the built-in VLM on the synthetic visual-QA task (GPU, a few minutes), then measure it.

    PYTHONPATH=$PWD python3 jobs/train_builtin.py --out OUT [--variants w256l4,w128l6] [--steps 8000]
    PYTHONPATH=$PWD python3 jobs/train_builtin.py --finalize pipeline/builtin_model --eval teacher --device cpu

Reproducible from ``--seed``: the data (pipeline.data.synthetic), the initialization and the batch
order all derive from it (GPU kernels are not bit-deterministic, so a re-run matches statistically,
not bit for bit). ``--budget-s`` caps training time by cutting steps after step 70; the record
keeps ``steps_done`` so that ``--steps N`` without a budget repeats the schedule. The processor
(tokenizer, image processor, chat template) is read from ``pipeline/builtin_model/`` when it is
there, so token ids never depend on the machine; otherwise it is built and saved beside the weights.

For every variant (an architecture size) it trains, rounds the weights to fp16 (what ships), then
``finalize``: picks the outlier channels of ``B.OUTLIER_RECIPE`` (the function-preserving outlier
variant), makes the fp16 weights exact under that rescaling, and scores the ``builtin-vqa`` test
split for fp and RTN W4/W3/W2 g128 on both models. ``--finalize DIR`` does only that, on an
existing folder. With ``--parallel`` variants train at the same time in separate processes (tiny
models leave most of an H100 idle). Writes, under ``--out``: ``<variant>/model/`` (a complete model
folder with builtin_info.json), ``<variant>/results.json``, ``<variant>.tar`` of the model folder,
and ``results.json`` with every variant side by side.

The shipped model: ``--variants w256l4 --steps 11000 --batch 512 --lr 1.5e-3 --train-samples 400000
--budget-s 300`` on one H100 (the budget cut it to 8058 steps), then ``--finalize`` on CPU.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import subprocess
import sys
import tarfile
import time
import types
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _light_packages() -> None:
    """Import our subpackages without their ``__init__`` when those are mid-edit or need extras
    (Ray...): this job only needs the pure modules it names."""
    for pkg in ("pipeline.models", "pipeline.evaluate", "pipeline.quant", "pipeline.data"):
        try:
            importlib.import_module(pkg)
        except Exception:  # noqa: BLE001 - any failure of a package __init__ we do not need
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(ROOT / pkg.replace(".", "/"))]
            sys.modules[pkg] = mod


_light_packages()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.data import synthetic  # noqa: E402
from pipeline.evaluate.vqa import evaluate_builtin_vqa  # noqa: E402
from pipeline.models import builtin as B  # noqa: E402

VARIANTS: dict[str, B.BuiltinSize] = {
    "tiny": B.BuiltinSize(text_hidden=128, text_intermediate=256, text_layers=1, vision_layers=1, vision_hidden=64, vision_intermediate=128),
    "w128l6": B.BuiltinSize(text_hidden=128, text_intermediate=384, text_layers=6),
    "w256l3": B.BuiltinSize(text_hidden=256, text_intermediate=512, text_layers=3, text_kv_heads=2),
    "w256l4": B.BuiltinSize(text_hidden=256, text_intermediate=512, text_layers=4),
}


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------- processor and data


def get_processor(out: Path):
    from transformers import AutoProcessor

    if (B.BUILTIN_DIR / "tokenizer.json").is_file():
        return AutoProcessor.from_pretrained(B.BUILTIN_DIR)
    proc = B.build_processor()
    proc.save_pretrained(out / "processor")
    return AutoProcessor.from_pretrained(out / "processor")


def _chunk(args):
    split, start, stop, seed = args
    xs = synthetic.generate_range(split, start, stop, seed)
    return np.stack([np.asarray(s.image) for s in xs]), [s.question for s in xs], [s.answer for s in xs]


def make_data(processor, n: int, seed: int, workers: int) -> dict[str, torch.Tensor]:
    """Images (uint8), right-padded token ids, labels (answer + </s> only), lengths."""
    import multiprocessing as mp

    step = 2000
    jobs = [("train", s, min(n, s + step), seed) for s in range(0, n, step)]
    with mp.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_chunk, jobs)
    images = np.concatenate([p[0] for p in parts])
    questions = [q for p in parts for q in p[1]]
    answers = [a for p in parts for a in p[2]]
    tok = processor.tokenizer
    n_img = (synthetic.IMAGE_SIZE // B.PATCH_SIZE) ** 2
    # Fast path for the prompt, checked against the processor's own template + image expansion.
    prompts = [f"USER: {B.IMAGE_TOKEN * n_img}\n{q} ASSISTANT:" for q in questions]
    from pipeline.evaluate.vqa import build_prompts

    ref = processor(
        images=[images[i] for i in range(16)], text=build_prompts(processor, questions[:16]), padding=False
    )["input_ids"]
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    assert [list(r) for r in ref] == prompt_ids[:16], "prompt fast path disagrees with the processor"
    full_ids = tok([p + " " + a + tok.eos_token for p, a in zip(prompts, answers)], add_special_tokens=False)["input_ids"]
    L = max(len(f) for f in full_ids)
    ids = torch.full((n, L), tok.pad_token_id, dtype=torch.int32)
    labels = torch.full((n, L), -100, dtype=torch.int64)
    lengths = torch.zeros(n, dtype=torch.int32)
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        assert f[: len(p)] == p
        ids[i, : len(f)] = torch.tensor(f, dtype=torch.int32)
        labels[i, len(p) : len(f)] = torch.tensor(f[len(p) :])
        lengths[i] = len(f)
    pv_ref = processor.image_processor(images=[images[i] for i in range(16)], return_tensors="pt")["pixel_values"]
    diff = float((B.pixel_values([images[i] for i in range(16)]) - pv_ref).abs().max())
    log(f"data: {n} samples, max len {L}; pixel fast path vs processor max |diff| {diff:.2e}")
    if diff > 1e-5:  # e.g. a torchvision resize that is not the identity at 48 px
        log(f"WARNING: pixel fast path differs from this machine's image processor by {diff:.2e}")
    return {"images": torch.from_numpy(images), "ids": ids, "labels": labels, "lengths": lengths}


# ---------------------------------------------------------------- training


def train(size: B.BuiltinSize, processor, data, args, device: torch.device):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(B.build_config(size, processor)).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    steps = args.steps
    warm = max(1, steps // 25)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return 0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    images = data["images"].to(device)
    ids = data["ids"].to(device).long()
    labels = data["labels"].to(device)
    lengths = data["lengths"].to(device)
    mean = torch.tensor(B.IMAGE_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(B.IMAGE_STD, device=device).view(1, 3, 1, 1)
    n = ids.shape[0]
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    perm = torch.randperm(n, generator=g)
    pos = 0
    t0 = time.time()
    amp = device.type == "cuda"
    step = 0
    while step < steps:
        if step == 20:
            t20 = time.time()
        if step == 70 and args.budget_s:  # fit the time budget: fewer steps, same schedule shape
            per_step = (time.time() - t20) / 50
            fit = int(args.budget_s / per_step)
            if fit < steps:
                log(f"{per_step * 1e3:.1f} ms/step: {steps} steps -> {fit} to fit {args.budget_s:.0f}s")
                steps = max(fit, 100)
                warm = max(1, steps // 25)  # as if --steps had been given: `--steps N` reproduces it
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + args.batch].to(device)
        pos += args.batch
        L = int(lengths[idx].max())
        x = ids[idx, :L]
        am = (torch.arange(L, device=device)[None] < lengths[idx, None]).long()
        pv = (images[idx].permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=x, pixel_values=pv, attention_mask=am, labels=labels[idx, :L], use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == steps - 1:
            log(f"step {step:6d} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
        step += 1
    model.eval()
    return model, n_params, time.time() - t0, steps


# ---------------------------------------------------------------- measurement


def fp16_round_(model) -> None:
    """Round every weight to fp16 (what ships), keeping fp32 compute."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


_TEST: list = []


def measure(model, processor, args, device, label: str) -> dict:
    """fp and RTN W4/W3/W2 g128 accuracy on the test split. ``--eval teacher`` scores by one
    teacher-forced pass (equal to greedy exact match, 6x cheaper: for CPU runs)."""
    from pipeline.evaluate.vqa import teacher_forced_accuracy

    if not _TEST:
        _TEST.extend(synthetic.generate("test", args.eval_n, 0))
    res = {}
    for bits in (None, 4, 3, 2):
        m = model if bits is None else B.rtn_fake_quant_(copy.deepcopy(model), bits, 128)
        if args.eval == "teacher":
            r = teacher_forced_accuracy(m, processor, _TEST, args.eval_batch, device)
        else:
            r = evaluate_builtin_vqa(m, processor, args.eval_n, 0, args.eval_batch, device, samples=_TEST)
        key = "fp" if bits is None else f"rtn_w{bits}"
        res[key] = {"accuracy": r["accuracy"], "per_skill": r["per_skill"]}
        log(f"{label} {key}: {r['accuracy']:.4f} " + " ".join(f"{k}={v:.2f}" for k, v in r["per_skill"].items()))
    return res


@torch.no_grad()
def max_logit_diff(a, b, processor, device) -> float:
    from pipeline.evaluate.vqa import build_prompts

    xs = synthetic.generate("test", 16, 1)
    enc = processor(images=[s.image for s in xs], text=build_prompts(processor, [s.question for s in xs]), padding=True, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    return float((a(**enc).logits - b(**enc).logits).abs().max())


def save_folder(model, folder: Path) -> None:
    """The model in fp16 plus the shipped processor files, copied verbatim."""
    import shutil

    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg.dtype = torch.float16  # the stored dtype, whatever we computed in
    model.half().save_pretrained(folder)
    model.float()
    src = B.BUILTIN_DIR if (B.BUILTIN_DIR / "tokenizer.json").is_file() else Path(folder).parent / "processor"
    for f in B._PROCESSOR_FILES:
        if Path(src / f).resolve() != Path(folder / f).resolve():
            shutil.copy2(src / f, folder / f)


def finalize(folder: Path, processor, args, device, record: dict) -> dict:
    """After training (or on a shipped folder, with ``--finalize``): choose the outlier channels
    (``B.OUTLIER_RECIPE``), make the fp16 weights exact under the rescaling, measure the plain and
    the outlier model, and write the record to ``builtin_info.json``."""
    from transformers import LlavaForConditionalGeneration

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    rcp = B.OUTLIER_RECIPE
    calib = synthetic.generate("calib", rcp["calib_samples"], 0)
    channels = B.pick_outlier_channels(model, rcp["counts"], importance=B.channel_importance(model, processor, calib))
    B.make_outlier_exact_(model, channels, rcp["log2_k"])
    save_folder(model, folder)
    om = copy.deepcopy(model)
    B.plant_outliers(om, channels, rcp["log2_k"])
    diff = max_logit_diff(model, om, processor, device)
    log(f"outlier variant: max |logit diff| vs plain = {diff}")
    record = dict(record)
    record["plain"] = measure(model, processor, args, device, "plain")
    record["outlier_variant"] = {
        **{k: rcp[k] for k in ("log2_k", "counts", "calib_samples")},
        "channels": {str(i): v for i, v in channels.items()},
        "max_logit_diff_vs_plain": diff,
        "heavy_channel_ratio": {"plain": B.outlier_ratios(model, processor, calib), "outlier": B.outlier_ratios(om, processor, calib)},
        "results": measure(om, processor, args, device, "outlier"),
    }
    record["eval"] = {"split": "test", "n": args.eval_n, "seed": 0, "scoring": args.eval, "device": str(device)}
    (folder / "builtin_info.json").write_text(json.dumps(record, indent=1))
    return record


def run_variant(name: str, processor, data, args, device) -> dict:
    size = VARIANTS[name]
    log(f"== variant {name}: {asdict(size)}")
    model, n_params, train_s, steps = train(size, processor, data, args, device)
    fp16_round_(model)
    folder = Path(args.out) / name / "model"
    save_folder(model, folder)
    record = {
        "variant": name, "size": asdict(size), "params": n_params, "train_seconds": round(train_s, 1), "steps_done": steps,
        "recipe": {k: getattr(args, k) for k in ("seed", "steps", "batch", "lr", "wd", "train_samples", "budget_s")},
    }
    out = finalize(folder, processor, args, device, record)
    (Path(args.out) / name / "results.json").write_text(json.dumps(out, indent=1))
    with tarfile.open(Path(args.out) / f"{name}.tar", "w") as tf:
        tf.add(folder, arcname=f"{name}")
    return out


def table(results: list[dict]) -> str:
    rows = ["variant        params  model     fp     w4     w3     w2"]
    for r in results:
        for label, res in (("plain", r["plain"]), ("outlier", r["outlier_variant"]["results"])):
            rows.append(f"{r.get('variant', '?'):12s} {r.get('params', 0) / 1e6:5.2f}M {label:8s} " + " ".join(
                f"{res[k]['accuracy']:.3f}" for k in ("fp", "rtn_w4", "rtn_w3", "rtn_w2")))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "train-out"))
    ap.add_argument("--variants", default="w256l4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--train-samples", type=int, default=300_000)
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--eval-batch", type=int, default=500)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=500)
    ap.add_argument("--budget-s", type=float, default=0.0, help="cap training time (seconds), fewer steps if needed")
    ap.add_argument("--parallel", action="store_true", help="train the variants in separate processes at once")
    ap.add_argument("--eval", choices=("greedy", "teacher"), default="greedy", help="greedy decoding, or the equal teacher-forced score")
    ap.add_argument("--finalize", metavar="DIR", help="skip training: choose outlier channels and measure an existing model folder")
    ap.add_argument("--data", help=argparse.SUPPRESS)  # worker mode: a saved dataset
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            sys.exit(f"unknown variant {n!r}; known: {', '.join(VARIANTS)}")
    processor = get_processor(out)
    if args.finalize:
        folder = Path(args.finalize)
        prev = B.builtin_info(folder)
        keep = {k: prev[k] for k in ("variant", "size", "params", "train_seconds", "steps_done", "recipe") if k in prev}
        if "plain" in prev:
            keep["training_run_eval"] = {"plain": prev["plain"], "eval_n": prev.get("recipe", {}).get("eval_n")}
        rec = finalize(folder, processor, args, device, keep)
        log("summary\n" + table([rec]))
        return
    if args.data:  # worker: one variant, data already made
        data = torch.load(args.data)
        run_variant(names[0], processor, data, args, device)
        return
    t0 = time.time()
    data = make_data(processor, args.train_samples, args.seed, args.workers)
    log(f"data made in {time.time() - t0:.0f}s")
    if args.parallel and len(names) > 1:
        path = out / "data.pt"
        torch.save(data, path)
        argv = [a for a in sys.argv[1:]]
        procs = []
        for n in names:
            cmd = [sys.executable, __file__, *argv, "--variants", n, "--data", str(path)]
            logf = open(out / f"{n}.log", "w")
            procs.append((n, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf))
        for n, p, f in procs:
            p.wait()
            f.close()
            log(f"{n} exited {p.returncode}; log tail:\n" + "".join(open(out / f"{n}.log").readlines()[-12:]))
        path.unlink()
        results = [json.loads((out / n / "results.json").read_text()) for n in names if (out / n / "results.json").is_file()]
    else:
        results = [run_variant(n, processor, data, args, device) for n in names]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("summary\n" + table(results))


if __name__ == "__main__":
    main()
