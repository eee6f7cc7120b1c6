"""What makes a work directory resumable: a fingerprint of (model, recipe, data, code).

Finished blocks are their part files (written atomically); everything else a job computes is
either cheap to redo or saved here as small JSON (sensitivity ratios, partition). ``--resume``
continues only a job with the same fingerprint; a different one is refused, never mixed. The
lm_head's own fields are left out of it (``HEAD_FIELDS``): its part is checked by scheme instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import JobSpec
from ..errors import VlmqError

STATE_NAME = "job.json"
_EDGE = 1 << 20  # bytes hashed at each end of a weight file


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_identity(p: Path) -> dict[str, Any]:
    """Size plus a hash of both ends: cheap for 100 GB of weights, catches a re-trained copy."""
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return {"name": p.name, "size": size, "edges": h.hexdigest()[:16]}


def model_identity(model_ref: str) -> dict[str, Any]:
    d = Path(model_ref)
    files = sorted([*d.glob("*.safetensors"), *d.glob("*.bin"), d / "config.json"], key=lambda p: p.name)
    marker = d / "synthetic.json"
    if marker.is_file():
        files.append(marker)
    return {"files": [_file_identity(p) for p in files if p.is_file()]}


def data_identity(spec: JobSpec) -> dict[str, Any]:
    c = dataclasses.asdict(spec.calib)
    src = Path(spec.calib.source)
    if spec.calib.source.split(":")[0] != "builtin" and src.exists():
        c["files"] = [_file_identity(p) for p in ([src] if src.is_file() else sorted(src.rglob("*.arrow")))]
    return c


def code_identity() -> dict[str, Any]:
    """The numerics' source: a change to any search changes what a block would contain."""
    quant = Path(__file__).resolve().parents[1] / "quant"
    h = hashlib.sha256()
    for p in sorted(quant.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return {"version": __version__, "quant_sources": h.hexdigest()[:16]}


# The lm_head's fields: no block, sensitivity or partition depends on them, and the head's part
# file records its own scheme (``stages.quantize_head`` redoes a head of another scheme), so a
# job resumed with another head precision keeps its finished blocks.
HEAD_FIELDS = ("quantize_lm_head", "lm_head_bits", "lm_head_group_size")


def fingerprint(spec: JobSpec, model_ref: str) -> dict[str, Any]:
    recipe = {k: v for k, v in dataclasses.asdict(spec.recipe).items() if k not in HEAD_FIELDS}
    return {
        "model": _sha(model_identity(model_ref)),
        "recipe": recipe,
        "data": _sha(data_identity(spec)),
        "code": _sha(code_identity()),
    }


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for k in ("model", "data", "code"):
        if old.get(k) != new.get(k):
            parts.append({"model": "the model's weights or config", "data": "the calibration data",
                          "code": "vlmq's numerics (code version)"}[k])
    o, n = old.get("recipe", {}), new.get("recipe", {})
    diffs = [f"{k} {o.get(k)!r} -> {n.get(k)!r}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    if diffs:
        parts.append("the recipe (" + ", ".join(diffs) + ")")
    return "; ".join(parts)


def prepare_work_dir(spec: JobSpec, model_ref: str) -> bool:
    """Create, check or clear the work directory. Returns True when resuming a previous job."""
    work = spec.work_path
    state_file = work / STATE_NAME
    fp = fingerprint(spec, model_ref)
    if state_file.is_file():
        old = json.loads(state_file.read_text())
        if spec.resume:
            if old.get("fingerprint") != fp:
                raise VlmqError(
                    f"--resume refused: {work} holds a job with different {_describe_change(old['fingerprint'], fp)}",
                    "resume with the original settings, or start over with --overwrite (or another --out)",
                )
            return True
        if not spec.overwrite:
            raise VlmqError(f"{work} holds an unfinished job",
                            "pass --resume to continue it, or --overwrite to start over")
        shutil.rmtree(work)
    elif work.exists() and any(work.iterdir()) and not spec.overwrite:
        raise VlmqError(f"work directory {work} is not empty and is not a vlmq job",
                        "choose another --work-dir, or pass --overwrite")
    work.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, "spec": spec.to_dict()}, indent=2, default=str))
    tmp.replace(state_file)
    return False
