"""The `vlmq` command. Each subcommand parses flags, builds a validated spec and calls one function.

Heavy imports (torch, transformers, ray) happen inside the handlers so `vlmq --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import VlmqError

QUANTIZE_EXAMPLES = """\
examples:
  # the built-in model, W4 g128 RTN, on a local Ray instance
  vlmq quantize --model builtin --calib builtin --method rtn --wbits 4 --out w4-rtn

  # a real model, MBQ W3 with 128 COCO caption rows from a Parquet file
  vlmq quantize --model /models/Qwen2-VL-7B-Instruct --calib coco.parquet \\
      --method mbq --wbits 3 --group-size 128 --out qwen2vl-w3-mbq

  # W4A8 (per-channel symmetric int4 weights, dynamic per-token int8 activations)
  vlmq quantize --model /models/llava-onevision-7b --calib coco.parquet --method mbq \\
      --wbits 4 --abits 8 --out llava-ov-w4a8

  # also pack the lm_head (faster decode, some accuracy lost: compare the report's KL)
  vlmq quantize --model /models/Qwen2-VL-7B-Instruct --calib coco.parquet --method awq \\
      --wbits 4 --quantize-lm-head --out qwen2vl-w4-head

  # W3 decoder layers, but a W4 g64 lm_head (the most sensitive Linear gets more bits)
  vlmq quantize --model /models/Qwen2-VL-7B-Instruct --calib coco.parquet --method mbq \\
      --wbits 3 --lm-head-bits 4 --lm-head-group-size 64 --out qwen2vl-w3-head4

  # a job file, with flags overriding it; on a cluster
  ray job submit --working-dir . -- vlmq quantize jobs/qwen2-vl-72b-mbq-w3.yaml

calibration sources (--calib): builtin | FILE.parquet | FILE.jsonl (+ --image-dir) | a datasets
save_to_disk folder. Rows: image + prompt/question + answer/caption.
"""


def _bool_flag(p: argparse.ArgumentParser, name: str, dest: str, help: str) -> None:
    p.add_argument(f"--{name}", dest=dest, action="store_true", default=argparse.SUPPRESS, help=help)
    p.add_argument(f"--no-{name}", dest=dest, action="store_false", default=argparse.SUPPRESS)


def _group_size(v: str) -> Any:
    from .config import PER_CHANNEL_WORDS

    return None if v.lower() in PER_CHANNEL_WORDS else int(v)


def _head_group_size(v: str) -> Any:
    """Like --group-size, but per-channel is 0: None already means "the recipe's group size"."""
    g = _group_size(v)
    return 0 if g is None else g


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("job", nargs="?", help="optional job YAML; flags override its values")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=S, help="model folder (config.json + safetensors), 'builtin', 'builtin-outlier' (the built-in model with planted outlier channels, fp-identical), or 'synthetic:NAME' (real shapes, generated weights)")
    g.add_argument("--calib", dest="calib.source", default=S, help="calibration source (default: builtin)")
    g.add_argument("--num-samples", dest="calib.num_samples", type=int, default=S, help="calibration samples (default 128)")
    g.add_argument("--holdout", dest="calib.holdout", type=int, default=S, help="held-out samples for fidelity (default 8)")
    g.add_argument("--seed", dest="calib.seed", type=int, default=S, help="sampling seed (default 42)")
    g.add_argument("--calib-mode", dest="calib.mode", choices=("auto", "caption", "qa", "mixed"), default=S,
                   help="built-in set: caption rows (MBQ's choice for real models), QA rows, or both; "
                   "auto (default): QA for the built-in model, which was trained on QA only, else captions")
    g.add_argument("--image-dir", dest="calib.image_dir", default=S, help="JSONL sources: folder the image paths are relative to")
    g.add_argument("--split", dest="calib.split", default=S, help="datasets DatasetDict folders: which split (default train)")
    g.add_argument("--max-length", dest="calib.max_length", type=int, default=S, help="skip samples longer than this many tokens (a cut would lose the answer)")
    g.add_argument("--allow-pickle", dest="allow_pickle", action="store_true", default=S,
                   help="allow .bin/.pt (pickle) weights; safetensors only otherwise")
    g = p.add_argument_group("recipe")
    g.add_argument("--method", dest="recipe.method", default=S,
                   choices=("rtn", "awq", "mbq", "smoothquant", "qvlm", "qvlm+mbq"), help="default rtn")
    g.add_argument("--wbits", dest="recipe.wbits", type=int, default=S, help="weight bits: 2, 3, 4 or 8 (default 4)")
    g.add_argument("--abits", dest="recipe.abits", type=int, default=S, help="activation bits: 16 (default) or 8 (W4A8)")
    g.add_argument("--group-size", dest="recipe.group_size", type=_group_size, default=S,
                   help="32, 64, 128 (default) or 'channel'")
    _bool_flag(g, "sym", "recipe.sym", "symmetric weights (loads in transformers/vLLM's symmetric path)")
    _bool_flag(g, "quantize-lm-head", "recipe.quantize_lm_head",
               "also pack the lm_head (RTN, same bits / group size / symmetry as the layers unless "
               "--lm-head-bits / --lm-head-group-size; default off: "
               "fp16, as MBQ/AWQ keep it). Why: decode speed and size; the fp16 head is ~17%% of a W4 7B "
               "decode step (w4+head in `vlmq bench decode`). Cost: accuracy; the head is usually the most "
               "sensitive Linear (check the report's KL vs fp). Tied embeddings are untied: embed_tokens "
               "stays fp16. Weight-only: not with --abits 8")
    g.add_argument("--lm-head-bits", dest="recipe.lm_head_bits", type=int, default=S, metavar="BITS",
                   help="the packed lm_head's own bits, 2, 3, 4 or 8 (default: --wbits); implies "
                   "--quantize-lm-head. The head is the most sensitive Linear, so give it more bits than "
                   "the layers: W3 layers + W4 head keeps most of the decode gain at less accuracy cost "
                   "(a W8 head: half the fp16 head's bytes, the least accuracy cost)")
    g.add_argument("--lm-head-group-size", dest="recipe.lm_head_group_size", type=_head_group_size, default=S,
                   metavar="G", help="the packed lm_head's own group size, 32, 64, 128 or 'channel' (default: "
                   "--group-size); implies --quantize-lm-head; must divide the hidden size. Symmetry "
                   "follows --sym")
    _bool_flag(g, "clip", "recipe.clip", "AWQ/MBQ clip search (default on)")
    g.add_argument("--loss", dest="recipe.loss", choices=("mae", "mse"), default=S, help="MBQ search loss (default mae)")
    g.add_argument("--sensitivity-floor", dest="recipe.sensitivity_floor", choices=("median", "none"), default=S,
                   help="MBQ: floor each ratio at its median over layers (default median)")
    _bool_flag(g, "clip-weighting", "recipe.mbq_clip_weighting",
               "MBQ: weight tokens by modality inside the clip search too (default on; off: the clip "
               "search weighs every token alike, as AWQ's)")
    g.add_argument("--partition", dest="recipe.partition", choices=("entropy", "dependency", "fixed"), default=S)
    g.add_argument("--p", dest="recipe.p", type=float, default=S, help="Q-VLM: quantile of the scores for tau")
    g.add_argument("--max-block-layers", dest="recipe.max_block_layers", type=int, default=S)
    g.add_argument("--iters", dest="recipe.iters", type=int, default=S, help="Q-VLM reconstruction iterations")
    g.add_argument("--lr", dest="recipe.lr", type=float, default=S)
    g.add_argument("--batch-size", dest="recipe.batch_size", type=int, default=S)
    _bool_flag(g, "veo", "recipe.veo", "Q-VLM visual-encoder optimization (tune the projector, then partition)")
    g.add_argument("--veo-steps", dest="recipe.veo_steps", type=int, default=S)
    g.add_argument("--veo-eta", dest="recipe.veo_eta", type=float, default=S, help="weight of the entropy term")
    g.add_argument("--veo-samples", dest="recipe.veo_samples", type=int, default=S)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=S, help="output checkpoint folder")
    g.add_argument("--overwrite", action="store_true", default=S, help="replace a non-empty --out")
    g.add_argument("--resume", action="store_true", default=S, help="continue a job: skip finished blocks")
    g.add_argument("--work-dir", dest="work_dir", default=S, help="scratch folder (default <out>.work)")
    g.add_argument("--keep-work", dest="keep_work", action="store_true", default=S, help="keep activations after success")
    g = p.add_argument_group("resources")
    g.add_argument("--address", dest="resources.address", default=S, help="Ray address (default: RAY_ADDRESS or local)")
    g.add_argument("--num-gpus", dest="resources.num_gpus", type=int, default=S)
    g.add_argument("--num-cpus", dest="resources.num_cpus", type=int, default=S)
    g.add_argument("--device", dest="resources.device", choices=("auto", "cpu", "cuda"), default=S)
    g.add_argument("--dtype", dest="resources.dtype", choices=("auto", "float16", "bfloat16", "float32"), default=S)
    g.add_argument("--store", dest="resources.store", default=S, help="activation store root (dir or pyarrow URI)")
    g.add_argument("--store-max-gb", dest="resources.store_max_gb", type=float, default=S)
    p.add_argument("--dry-run", action="store_true", help="validate the job and print the resolved spec; run nothing")
    for action in p._actions:  # 'recipe.wbits' -> WBITS in the usage line
        if action.metavar is None and action.nargs is None and action.option_strings and action.const is None \
                and not action.choices:
            action.metavar = action.dest.split(".")[-1].upper()


def args_to_dict(ns: argparse.Namespace) -> dict[str, Any]:
    """Dotted dests ('recipe.wbits') -> nested dict, only for flags the user actually gave."""
    out: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if key in ("job", "dry_run", "func", "command") or key.startswith("_"):
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def spec_from_args(ns: argparse.Namespace):
    from .config import load_yaml, merge, spec_from_dict

    data = load_yaml(ns.job) if getattr(ns, "job", None) else {}
    data = merge(data, args_to_dict(ns))
    if "model" not in data:
        raise VlmqError("no model given", "pass --model PATH (or 'builtin'), or set 'model:' in the job YAML")
    if "out" not in data:
        raise VlmqError("no output directory given", "pass --out DIR, or set 'out:' in the job YAML")
    return spec_from_dict(data)


def cmd_quantize(ns: argparse.Namespace) -> int:
    from .config import dump_yaml, head_plan

    spec = spec_from_args(ns)
    if ns.dry_run:
        from .distributed.job import check_job

        check_job(spec)
        print(dump_yaml(spec), end="")
        print(f"# recipe: {spec.recipe.label}")
        if spec.recipe.quantize_lm_head:
            print(f"# {head_plan(spec.recipe)}")
        return 0
    from .distributed.job import run_quantize
    from .evaluate.summary import print_summary

    result = run_quantize(spec)
    print_summary(result)
    return 0


def cmd_validate(ns: argparse.Namespace) -> int:
    from .checkpoint.validate import format_report, validate_checkpoint

    report = validate_checkpoint(ns.dir, n_samples=ns.samples, backend=ns.backend, device=ns.device,
                                 stream=ns.stream)
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_plan(ns: argparse.Namespace) -> int:
    from .distributed.planner import format_plan, plan_from_model

    plan = plan_from_model(ns.model, n_gpus=ns.gpus, gpu_mem_gib=ns.gpu_mem, dtype=ns.dtype,
                           tokens=ns.samples * ns.tokens_per_sample)
    print(format_plan(plan))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(ns.out, quick=ns.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmq",
        description="Post-training quantization of vision-language models (RTN, AWQ, MBQ, Q-VLM) on Ray. "
        "Writes compressed-tensors checkpoints that load in transformers/vLLM and run on vlmq's Triton kernels.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="start with:  vlmq demo      (quantizes the built-in model on CPU in a few minutes)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a VLM into a packed checkpoint", epilog=QUANTIZE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quantize_args(q)
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser("validate", help="re-hash, check and re-run a checkpoint against its reference",
                       epilog="example:  vlmq validate demo-out", formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("dir")
    v.add_argument("--samples", type=int, default=4, help="held-out samples to re-run (default 4)")
    v.add_argument("--backend", choices=("fake", "triton"), default="fake",
                   help="fake: dequantized weights (reference); triton: vlmq's packed kernels")
    v.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    v.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="re-run one decoder layer at a time (default: automatic above 4 GiB)")
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plan", help="per-layer memory and a shard plan, from config.json alone",
                        epilog="example:  vlmq plan --model /models/Qwen2-VL-72B-Instruct --gpus 4 --gpu-mem 80",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("--model", required=True, help="model folder (only config.json is read) or synthetic:NAME")
    pl.add_argument("--gpus", type=int, default=1)
    pl.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    pl.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    pl.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    pl.add_argument("--tokens-per-sample", type=int, default=700, help="average sample length (default 700)")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="quantize the built-in VLM on CPU and show accuracy before/after")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--quick", action="store_true", help="fewer calibration and evaluation samples")
    d.set_defaults(func=cmd_demo)

    _optional_commands(sub)
    return p


def _optional_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands that live with their subsystem (bench, eval, report)."""
    from .evaluate import commands

    commands.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        return int(ns.func(ns) or 0)
    except VlmqError as e:
        print(f"vlmq: error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
