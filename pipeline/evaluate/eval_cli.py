"""``vlmq eval CKPT... --tasks T... --out DIR``: many checkpoints x tasks on the Ray fleet.

Writes ``DIR/results.json`` (one row per checkpoint x task), ``DIR/report.md``,
``DIR/report.html`` (plots embedded) and ``DIR/plots/*.png``; finished work items stay in
``DIR/items/`` so re-running the same command only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import VlmqError

EXAMPLES = """\
examples:
  vlmq eval builtin --tasks builtin-vqa --out eval-fp            # the fp built-in model
  vlmq eval builtin w4-rtn w3-mbq --tasks builtin-vqa fidelity --out eval-grid
  vlmq eval qwen2vl-w4 qwen2vl-w3-mbq --tasks vqa:textvqa_val.jsonl mc:scienceqa_test.parquet \\
      --fp-model /models/Qwen2-VL-7B-Instruct --backend triton --address auto --out eval-qwen

checkpoints: 'builtin' (the fp built-in model), folders written by `vlmq quantize`, or plain
model folders (fp).

tasks (local data only; JSONL/Parquet images: 'image' bytes or path, or 'image_path', relative to the file):
  builtin-vqa          built-in synthetic test split, greedy, exact match; accuracy + per skill (1000)
  vqa:FILE             open-ended: question, answers (list) or answer, image, [category], [prompt];
                       VQAv2-normalized exact match (+ consensus min(n/3,1) with 3+ answers)
  mc:FILE              ScienceQA-style: question, choices (list), answer (index or letter),
                       [image], [hint], [subject]; parsed letter, unparseable = wrong
  caption-ppl:SOURCE   perplexity of caption/answer tokens; SOURCE as --calib (builtin, .parquet, ...)
  fidelity[:SOURCE]    vs the fp model (--fp-model or the checkpoint's report.json): KL(fp||quant),
                       top-1 agreement, perplexity; answer tokens and text tokens (default builtin:qa, 128)
  speed                weight bytes; peak GPU memory and batch-1 decode tokens/s on a GPU (added
                       unless --no-speed)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate checkpoints x tasks on a Ray fleet; table, report, plots",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="'builtin', quantized checkpoint or fp model folders")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK")
    p.add_argument("--out", required=True, help="output folder (results.json, report.md/html, items/)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--backend", choices=("fake", "triton"), default="fake",
                   help="quantized checkpoints: fake = dequantized weights (reference), triton = vlmq's kernels (GPU)")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: per task, see tasks)")
    p.add_argument("--seed", type=int, default=0, help="builtin-vqa test-split seed (default 0)")
    p.add_argument("--shard-size", type=int, default=None, help="examples per work item (default: per task)")
    p.add_argument("--workers", type=int, default=None, help="eval actors (default: one per GPU, else per CPU)")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray instance: CPUs to use")
    p.add_argument("--fp-model", default=None,
                   help="fp model for fidelity (default: the 'model' recorded in each checkpoint's report.json)")
    p.add_argument("--no-speed", action="store_true", help="leave out the speed/memory rows")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def plan(ns: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """Checkpoints and tasks from the arguments; every user-input error raises here, before Ray."""
    import torch

    from .tasks import parse_task
    from .tasks.checkpoints import resolve_checkpoint, unique_names

    if ns.shard_size is not None and ns.shard_size < 1:
        raise VlmqError(f"--shard-size must be >= 1, got {ns.shard_size}", "pass a positive number of examples")
    if ns.backend == "triton" and not ns.address and not torch.cuda.is_available():
        raise VlmqError("--backend triton runs vlmq's GPU kernels, and no CUDA GPU is visible",
                        "use --backend fake on CPU, or --address a Ray cluster with GPUs")
    if ns.fp_model not in (None, "builtin") and not Path(ns.fp_model).is_dir():
        raise VlmqError(f"--fp-model {ns.fp_model} is not a folder", "pass the fp model folder the checkpoints came from")
    specs = list(dict.fromkeys(ns.tasks + ([] if ns.no_speed or "speed" in ns.tasks else ["speed"])))
    tasks = [parse_task(t, ns.limit, ns.seed, ns.shard_size) for t in specs]
    ckpts = unique_names([resolve_checkpoint(c, ns.fp_model) for c in dict.fromkeys(ns.checkpoints)])
    return ckpts, tasks


def run_eval(ns: argparse.Namespace) -> dict[str, Any]:
    """Plan, run the fleet, write results.json and the report; returns the results document."""
    from ..distributed.fleet import run_fleet
    from ..distributed.progress import JobView
    from .report import write_eval_report
    from .tasks.items import ItemStore, assemble, build_matrix

    ckpts, tasks = plan(ns)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    view = JobView(quiet=getattr(ns, "quiet", False))
    items = build_matrix(ckpts, tasks, ns.backend)
    store = ItemStore(out)
    t0 = time.perf_counter()
    stats = run_fleet(items, store, address=ns.address, workers=ns.workers, num_cpus=ns.num_cpus, view=view)
    results = {it.id: r for it in items if (r := store.load(it.id)) is not None}
    rows = assemble(items, results)
    doc = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "backend": ns.backend, "seed": ns.seed,
                 "limit": ns.limit, "wall_s": time.perf_counter() - t0, "items": stats.total,
                 "resumed_items": stats.resumed, "executed_items": stats.executed,
                 "failed_fast_items": stats.failed_fast, "workers": stats.workers, "checkpoint_loads": stats.loads,
                 "actor_executed": sorted(i for w in stats.per_worker for i in w["executed"])},
        "checkpoints": [{"name": c.name, "path": c.path, "kind": c.kind, "method": c.method, "wbits": c.wbits,
                         "abits": c.abits, "group_size": c.group_size, "label": c.label,
                         "weight_bytes": c.weight_bytes, "fp_reference": c.reference} for c in ckpts],
        "tasks": [{"name": t.name, "kind": t.kind, "source": t.source, "examples": t.size()} for t in tasks],
        "rows": rows,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(out / "results.json")
    doc["report_files"] = [str(p) for p in write_eval_report(doc, out)]
    return doc


def cmd_eval(ns: argparse.Namespace) -> int:
    from rich.console import Console

    from .report import summary_table

    doc = run_eval(ns)
    console = Console()
    console.print(summary_table(doc))
    console.print(f"results: {Path(ns.out) / 'results.json'}   report: {Path(ns.out) / 'report.html'}")
    return 1 if any(r["status"] != "ok" for r in doc["rows"]) else 0
