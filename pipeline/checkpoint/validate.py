"""``vlmq validate DIR``: is this checkpoint complete, self-consistent, and does it compute what we searched?

Three checks, each reported with numbers:
1. integrity: ``manifest.json`` exists, says ``complete``, and every file's size and sha256 match
   (no file missing, none unlisted);
2. layout: the config's ``quantization_config`` agrees with the tensors: every Linear of the
   model that is not in ``ignore`` holds ``weight_packed``/``weight_scale``/``weight_shape``
   (+ ``weight_zero_point`` if asymmetric) of the right shapes and dtypes, nothing ignored is
   quantized, and every other tensor matches a parameter of the model;
3. outputs: the model reloaded from disk reproduces the fake-quant logits stored in
   ``validation/reference.safetensors`` to fp rounding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .layout import SCALE_DTYPES, act_bits_of, expected_layout, is_ignored, resolve_schemes, st_dtype
from .loader import config_dtype, empty_model, load_quantized_model, quantized_modules, read_config, weight_map
from .reference import read_reference
from .writer import MANIFEST_FORMAT, MANIFEST_NAME, sha256_files

# Relative tolerance on logits (max |diff| / max |reference|) by model dtype: "agree to fp rounding".
DEFAULT_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class CheckResult:
    name: str
    status: str  # "pass" | "fail" | "skip"
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationReport:
    ckpt_dir: Path
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks) and any(c.status == "pass" for c in self.checks)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)


def _guarded(name: str, fn: Any, *args: Any) -> CheckResult:
    import time

    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as e:  # a check that crashes is a failed check, reported, never a traceback
        result = CheckResult(name, "fail", f"{type(e).__name__}: {e}")
    result.numbers["seconds"] = round(time.perf_counter() - t0, 3)  # where a slow validate spends its time
    return result


def _integrity(ckpt_dir: Path) -> CheckResult:
    path = ckpt_dir / MANIFEST_NAME
    if not path.is_file():
        return CheckResult(
            "integrity", "fail",
            f"no {MANIFEST_NAME}: the checkpoint is incomplete (its writer crashed or has not finished); "
            "re-run the quantize job",
        )  # fmt: skip
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("complete") is not True:
        return CheckResult("integrity", "fail", f"{MANIFEST_NAME} is not a complete vlmq manifest")
    files: dict[str, dict[str, Any]] = manifest["files"]
    missing, bad_size, to_hash = [], [], []
    total = 0
    for rel, meta in sorted(files.items()):
        p = ckpt_dir / rel
        if not p.is_file():
            missing.append(rel)
            continue
        size = p.stat().st_size
        total += size
        if size != meta["size"]:
            bad_size.append(rel)
        else:
            to_hash.append(rel)
    hashes = sha256_files(ckpt_dir / rel for rel in to_hash)
    bad_hash = [rel for rel in to_hash if hashes[ckpt_dir / rel] != files[rel]["sha256"]]
    on_disk = {p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob("*") if p.is_file()}
    unlisted = sorted(on_disk - set(files) - {MANIFEST_NAME})
    nums = {"files": len(files), "bytes": total, "missing": missing, "size_mismatch": bad_size,
            "sha256_mismatch": bad_hash, "unlisted": unlisted}  # fmt: skip
    problems = [f"{k}: {v[:5]}" for k, v in nums.items() if isinstance(v, list) and v]
    if problems:
        return CheckResult("integrity", "fail", "; ".join(problems), nums)
    return CheckResult("integrity", "pass", f"{len(files)} files, {total / 1e6:.1f} MB, every sha256 matches", nums)


def _headers(ckpt_dir: Path, wmap: dict[str, str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every indexed tensor, from the shard headers alone."""
    out = {}
    for shard in sorted(set(wmap.values())):
        with safe_open(str(ckpt_dir / shard), framework="pt") as f:
            keys = set(f.keys())
            for name in [n for n, s in wmap.items() if s == shard]:
                if name not in keys:
                    raise ValueError(f"index says {name} is in {shard}, but it is not")
                t = f.get_slice(name)
                out[name] = (tuple(t.get_shape()), st_dtype(t.get_dtype()))
    return out


def _layout(ckpt_dir: Path) -> CheckResult:
    config = read_config(ckpt_dir)
    qconfig = config.get("quantization_config")
    if not qconfig:
        return CheckResult("layout", "fail", "config.json has no quantization_config")
    wmap = weight_map(ckpt_dir)
    heads = _headers(ckpt_dir, wmap)
    schemes = resolve_schemes(qconfig, quantized_modules(wmap))
    ignore = qconfig.get("ignore") or []
    model = empty_model(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}

    problems: list[str] = []
    n_quant = 0
    for name, lin in linears.items():
        if is_ignored(name, ignore):
            continue
        if name not in schemes:
            problems.append(f"{name} is neither ignored nor quantized")
            continue
        n_quant += 1
        spec = expected_layout(lin.out_features, lin.in_features, schemes[name])
        for suffix, (shape, dt) in spec.items():
            got = heads.get(f"{name}.{suffix}")
            if got is None:
                problems.append(f"{name}.{suffix} missing")
            elif got[0] != shape or (dt is not None and got[1] != dt) or (dt is None and got[1] not in SCALE_DTYPES):
                problems.append(f"{name}.{suffix}: {got} != expected {(shape, dt or 'float')}")
        if f"{name}.weight" in heads:
            problems.append(f"{name} is quantized but also stores a dense weight")
    stray = [m for m in schemes if m not in linears]
    problems += [f"{m} is quantized but is no Linear of the model" for m in stray]

    quant_names = {f"{m}.{s}" for m in schemes for s in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")}
    quant_dense = {f"{m}.weight" for m in schemes}
    for name, (shape, _) in heads.items():
        if name in quant_names:
            continue
        if name not in expected:
            problems.append(f"{name} is not a tensor of the model")
        elif expected[name] != shape:
            problems.append(f"{name}: shape {shape} != model's {expected[name]}")
    aliases = _tied_aliases(model)
    absent = [n for n in expected if n not in heads and n not in quant_dense and not (aliases.get(n, set()) & heads.keys())]
    problems += [f"{n} missing" for n in absent]
    nums = {"quantized_linears": n_quant, "ignored": len(ignore), "tensors": len(heads), "problems": len(problems)}
    if problems:
        return CheckResult("layout", "fail", "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""), nums)
    return CheckResult("layout", "pass", f"{n_quant} quantized Linears, {len(ignore)} ignored, {len(heads)} tensors consistent", nums)


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> the other names of the same tensor (tied embeddings)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    by_id: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(n)
    return {n: names - {n} for names in by_id.values() for n in names}


STREAM_ABOVE_BYTES = 4 * 2**30  # larger checkpoints are re-run one decoder layer at a time


def _checkpoint_logits(ckpt_dir: Path, inputs: list, backend: str, device: str, model_dtype: torch.dtype,
                       stream: bool) -> list[torch.Tensor]:
    """The reloaded checkpoint's logits on the reference inputs: the whole model, or (``stream``)
    one decoder layer resident at a time, so a 72B checkpoint validates on one GPU."""
    if stream:
        from ..evaluate.streamed import act_quant_hook, streamed_logits
        from ..models import detect_adapter
        from .source import CheckpointSource

        src = CheckpointSource(ckpt_dir, device=device)
        return streamed_logits(src, detect_adapter(src.config_dict), inputs, model_dtype, device,
                               layer_hook=act_quant_hook(act_bits_of(src.qconfig)))
    model = load_quantized_model(ckpt_dir, backend=backend, dtype=model_dtype, device=device)
    outs = []
    with torch.no_grad():
        for inp in inputs:
            moved = {k: v.to(device, model_dtype) if v.is_floating_point() else v.to(device) for k, v in inp.items()}
            outs.append(model(**moved, use_cache=False).logits.float().cpu())
    return outs


def _outputs(ckpt_dir: Path, n_samples: int, backend: str, device: str, rtol: float | None,
             stream: bool | None = None) -> CheckResult:
    ref = read_reference(ckpt_dir)
    if ref is None:
        return CheckResult("outputs", "skip", "no validation/reference.safetensors: outputs not compared")
    n = max(1, n_samples)
    inputs, ref_logits = ref.inputs[:n], ref.logits[:n]
    model_dtype = ref.model_dtype or config_dtype(read_config(ckpt_dir))
    if rtol is None:
        # vlmq's kernels take 16-bit activations (fp32 ones are cast down): judge them at fp16 rounding
        dt = torch.float16 if backend == "triton" and model_dtype == torch.float32 else model_dtype
        rtol = DEFAULT_RTOL.get(dt, 1e-2)
    if stream is None:
        from .source import dequantized_bytes

        stream = backend == "fake" and dequantized_bytes(ckpt_dir) > STREAM_ABOVE_BYTES
    if stream and backend != "fake":
        return CheckResult("outputs", "fail", "the layer-streamed check runs the fake-quant reference path only")
    worst_rel, worst_abs, agree, total = 0.0, 0.0, 0, 0
    outs = []
    positions = ref.positions or [None] * len(inputs)
    for out, ref_l, pos in zip(_checkpoint_logits(ckpt_dir, inputs, backend, device, model_dtype, stream),
                               ref_logits, positions):
        ref_f = ref_l.float()
        if pos is not None:  # the reference keeps some positions' logits only
            out = out.reshape(-1, out.shape[-1])[pos.to(out.device)]
        if out.numel() != ref_f.numel():
            return CheckResult("outputs", "fail", f"logits shape {tuple(out.shape)} != reference {tuple(ref_f.shape)}")
        out = out.reshape(ref_f.shape)  # a stored [T, V] reference against [1, T, V] logits
        diff = (out - ref_f).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(ref_f.abs().max().item(), 1e-12))
        agree += (out.argmax(-1) == ref_f.argmax(-1)).sum().item()
        total += out.shape[:-1].numel()
        outs.append(out)
    nums = {"samples": len(inputs), "max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "rtol": rtol,
            "top1_agreement": agree / max(total, 1), "backend": backend, "streamed": stream}  # fmt: skip
    msg = f"{len(inputs)} samples, max |diff| {worst_abs:.3g} ({worst_rel:.3g} of max |logit|, tol {rtol:g}), top-1 agreement {agree / max(total, 1):.4f}"
    if ref.fp_logits is not None:
        kl, top1 = fidelity_vs_fp(outs, ref.fp_logits[: len(outs)])
        nums.update(kl_vs_fp=kl, top1_vs_fp=top1)
        msg += f"; vs fp: KL {kl:.4g}, top-1 {top1:.4f}"
    return CheckResult("outputs", "pass" if worst_rel <= rtol else "fail", msg, nums)


def fidelity_vs_fp(quant: list[torch.Tensor], fp: list[torch.Tensor]) -> tuple[float, float]:
    """Mean per-position KL(fp || quant) in nats, and top-1 agreement, over all samples' positions."""
    kl_sum, agree, n = 0.0, 0, 0
    for q, f in zip(quant, fp):
        f = f.reshape(q.shape)
        lq = torch.log_softmax(q.double(), -1)
        lf = torch.log_softmax(f.double(), -1)
        kl_sum += (lf.exp() * (lf - lq)).sum(-1).sum().item()
        agree += (q.argmax(-1) == f.argmax(-1)).sum().item()
        n += q.shape[:-1].numel()
    return kl_sum / max(n, 1), agree / max(n, 1)


def check_integrity(ckpt_dir: str | os.PathLike) -> CheckResult:
    """Manifest present and complete; every file's size and sha256 match; no file missing or unlisted."""
    return _guarded("integrity", _integrity, Path(ckpt_dir))


def check_layout(ckpt_dir: str | os.PathLike) -> CheckResult:
    """quantization_config agrees with the tensors and with the model's Linears (headers only)."""
    return _guarded("layout", _layout, Path(ckpt_dir))


def check_outputs(
    ckpt_dir: str | os.PathLike, n_samples: int = 4, backend: str = "fake", device: str = "cpu",
    rtol: float | None = None, stream: bool | None = None,
) -> CheckResult:
    """The reloaded model reproduces the stored fake-quant logits to ``rtol`` (default by model dtype).
    ``stream``: re-run one decoder layer at a time (default: when the model is over 4 GiB)."""
    return _guarded("outputs", _outputs, Path(ckpt_dir), n_samples, backend, device, rtol, stream)


def validate_checkpoint(
    ckpt_dir: str | os.PathLike,
    n_samples: int = 4,
    backend: str = "fake",
    *,
    device: str = "cpu",
    rtol: float | None = None,
    stream: bool | None = None,
) -> ValidationReport:
    """Run every check; never raises for a bad checkpoint (the report says what is wrong)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return ValidationReport(d, [CheckResult("integrity", "fail", f"{d} is not a directory")])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:  # hashing (I/O, CPU) overlaps the outputs check (GPU)
        integrity = pool.submit(check_integrity, d)
        rest = [check_layout(d), check_outputs(d, n_samples, backend, device, rtol, stream)]
        checks = [integrity.result(), *rest]
    return ValidationReport(d, checks)


def format_report(report: ValidationReport) -> str:
    lines = [f"vlmq validate {report.ckpt_dir}: {'OK' if report.ok else 'FAILED'}"]
    for c in report.checks:
        secs = c.numbers.get("seconds")
        lines.append(f"  [{c.status.upper():4}] {c.name}: {c.message}" + (f" ({secs:.1f}s)" if secs is not None else ""))
    return "\n".join(lines)
