"""What a ``vlmq eval`` checkpoint argument is, and how a worker loads it.

- ``builtin``: the fp built-in model (``pipeline/builtin_model``);
- a folder written by ``vlmq quantize`` (``vlmq.json`` or a ``quantization_config`` in
  ``config.json``): a quantized checkpoint, loaded with ``checkpoint.loader.load_quantized_model``;
- any other model folder (``config.json`` + safetensors): an fp model, loaded with
  ``models.loading.build_model``.

Resolving is cheap and only fails (``VlmqError``) on what is plainly a wrong argument: a path
that does not exist, a file, a folder without ``config.json``. Anything else wrong with a
checkpoint (corrupt JSON, truncated shards, missing tensors) surfaces when a worker loads it and
fails that checkpoint's work items only.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import VlmqError

BUILTIN = "builtin"


@dataclass(frozen=True)
class CheckpointRef:
    spec: str  # what the user typed
    name: str  # short display name (unique within one run)
    path: str  # absolute folder
    kind: str  # "builtin" | "quantized" | "fp"
    fingerprint: str  # changes when the files change: part of every work item's id
    method: str = "fp"
    wbits: int = 16
    abits: int = 16
    group_size: int | None = None
    label: str = "fp"
    sym: bool = False
    weight_bytes: int = 0
    reference: str | None = None  # fp model folder to compare against (fidelity)
    recipe: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def quantized(self) -> bool:
        return self.kind == "quantized"


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files on disk (every ``*.safetensors`` in the folder)."""
    return sum(p.stat().st_size for p in weight_files(folder))


def fingerprint(folder: Path) -> str:
    """sha256 over the manifest (quantized) or names, sizes and mtimes of config + weights: cheap
    at any model size, and different whenever the checkpoint is rewritten."""
    h = hashlib.sha256()
    manifest = folder / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    for p in [folder / "config.json", *weight_files(folder)]:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _recipe_of(folder: Path, config: dict[str, Any] | None) -> dict[str, Any]:
    """method / wbits / abits / group_size / label from ``vlmq.json``, else the quantization_config."""
    meta = _read_json(folder / "vlmq.json") or {}
    rec = dict(meta.get("recipe") or {})
    out: dict[str, Any] = {"method": rec.get("method", "unknown"), "recipe": rec}
    wbits, group, sym = rec.get("wbits"), rec.get("group_size", "missing"), rec.get("sym")
    qcfg = (config or {}).get("quantization_config") or {}
    for grp in (qcfg.get("config_groups") or {}).values():
        w = grp.get("weights") or {}
        wbits = wbits or w.get("num_bits")
        if group == "missing":
            group = w.get("group_size")
        sym = w.get("symmetric") if sym is None else sym
        break
    out["wbits"] = int(wbits) if wbits else 0
    out["group_size"] = None if group == "missing" else group
    out["abits"] = int(meta.get("act_bits") or rec.get("abits") or 16)
    out["sym"] = bool(sym)
    g = "ch" if out["group_size"] is None else f"g{out['group_size']}"
    a = f"A{out['abits']}" if out["abits"] < 16 else ""
    out["label"] = rec.get("label") or f"{out['method']} W{out['wbits']}{a} {g}{' sym' if sym else ''}"
    return out


def resolve_checkpoint(spec: str, fp_model: str | None = None) -> CheckpointRef:
    """A checkpoint argument -> its reference (no weights read). Raises VlmqError on a bad path."""
    if spec == BUILTIN:
        from ...models.builtin import BUILTIN_DIR, builtin_available

        if not builtin_available():
            raise VlmqError(f"the built-in model is missing from {BUILTIN_DIR}",
                            "restore pipeline/builtin_model/ from git, or pass a model folder")
        folder = Path(BUILTIN_DIR).resolve()
        return CheckpointRef(spec, BUILTIN, str(folder), "builtin", fingerprint(folder),
                             weight_bytes=weight_bytes(folder), reference=str(folder))
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise VlmqError(f"checkpoint {spec} does not exist",
                        "pass folders written by `vlmq quantize`, plain model folders, or 'builtin'")
    if not folder.is_dir():
        raise VlmqError(f"checkpoint {spec} is a file", "pass the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise VlmqError(f"{spec} has no config.json: not a model folder",
                        "pass folders written by `vlmq quantize`, plain model folders, or 'builtin'")
    folder = folder.resolve()
    config = _read_json(folder / "config.json")
    if folder_kind(str(folder)) == "fp":
        return CheckpointRef(spec, folder.name, str(folder), "fp", fingerprint(folder),
                             weight_bytes=weight_bytes(folder), reference=str(folder))
    r = _recipe_of(folder, config)
    ref = fp_model
    if ref is None:  # the model the quantize job started from, when it is on this machine
        job = _read_json(folder / "report.json") or {}
        m = job.get("model")
        ref = m if isinstance(m, str) and Path(m).is_dir() else None
    if ref is not None:
        ref = BUILTIN_REF if ref == BUILTIN else str(Path(ref).expanduser().resolve())
    return CheckpointRef(spec, folder.name, str(folder), "quantized", fingerprint(folder), method=r["method"],
                         wbits=r["wbits"], abits=r["abits"], group_size=r["group_size"], label=r["label"],
                         sym=r["sym"], weight_bytes=weight_bytes(folder), reference=ref, recipe=r["recipe"])


def _builtin_ref() -> str:
    from ...models.builtin import BUILTIN_DIR

    return str(Path(BUILTIN_DIR).resolve())


BUILTIN_REF = "<builtin>"


def folder_kind(path: str) -> str:
    """``quantized`` for a folder written by ``vlmq quantize`` (or any compressed-tensors one), else ``fp``."""
    folder = Path(path)
    config = _read_json(folder / "config.json") or {}
    return "quantized" if (folder / "vlmq.json").is_file() or config.get("quantization_config") else "fp"


def reference_path(ref: CheckpointRef) -> str | None:
    if ref.reference == BUILTIN_REF:
        return _builtin_ref()
    return ref.reference


def base_name(ref: CheckpointRef) -> str:
    """Short name of the fp model a checkpoint came from (itself for fp models): plots group by it."""
    if ref.kind != "quantized":
        return ref.name
    path = reference_path(ref)
    if path is None:
        return "unknown fp model"
    return BUILTIN if Path(path) == Path(_builtin_ref()) else Path(path).name


def unique_names(refs: list[CheckpointRef]) -> list[CheckpointRef]:
    """Give equal display names their parent folder as a prefix (``a/w4`` and ``b/w4``)."""
    from dataclasses import replace

    counts: dict[str, int] = {}
    for r in refs:
        counts[r.name] = counts.get(r.name, 0) + 1
    out = []
    for r in refs:
        if counts[r.name] > 1 and r.kind != "builtin":
            p = Path(r.path)
            r = replace(r, name=f"{p.parent.name}/{p.name}")
        out.append(r)
    return out


# ----------------------------------------------------------------------------- loading


def _check_complete(folder: Path) -> None:
    """A quantized checkpoint must carry its manifest, and every file must have its recorded size
    (cheap; ``vlmq validate`` re-hashes everything)."""
    manifest = _read_json(folder / "manifest.json")
    if manifest is None or manifest.get("complete") is not True:
        raise VlmqError(f"{folder} has no complete manifest.json: the checkpoint is incomplete or damaged",
                        "re-run the quantize job, or `vlmq validate` it to see what is wrong")
    bad = [rel for rel, meta in (manifest.get("files") or {}).items()
           if not (folder / rel).is_file() or (folder / rel).stat().st_size != meta.get("size")]
    if bad:
        raise VlmqError(f"{folder}: files missing or of the wrong size: {bad[:5]}",
                        "re-copy or re-create the checkpoint (`vlmq validate` shows every problem)")


def load_checkpoint(path: str, kind: str, backend: str = "fake", device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on ``device``, processor) of a checkpoint folder."""
    from ...models.processors import load_processor

    folder = Path(path)
    if kind == "quantized":
        from ...checkpoint.loader import load_quantized_model

        _check_complete(folder)
        model = load_quantized_model(folder, backend=backend, dtype=dtype, device=device)
    else:
        from ...models import detect_adapter
        from ...models.loading import build_model
        from ...models.weights import open_source

        source = open_source(folder)
        model = build_model(source, detect_adapter(source.config_dict), dtype=dtype, device=device)
    return model.eval(), load_processor(folder)


def compute_dtype(device: torch.device, kind: str, path: str) -> torch.dtype:
    """float32 on CPU (fast and exact there); the checkpoint's 16-bit dtype on a GPU."""
    if device.type == "cpu":
        return torch.float32
    cfg = _read_json(Path(path) / "config.json") or {}
    text = cfg.get("text_config") or {}
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or "float16").replace("torch.", "")
    return torch.bfloat16 if name == "bfloat16" else torch.float16


class ModelCache:
    """Loaded models of one worker, least recently used first out (``capacity`` models). A load
    failure is cached too, so a broken checkpoint is not re-read for each of its items."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0

    def keys(self) -> list[tuple]:
        return list(self._items)

    def get(self, path: str, kind: str, backend: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
        key = (path, kind, backend)
        if key in self._items:
            self._items.move_to_end(key)
            hit = self._items[key]
            if isinstance(hit, BaseException):
                raise hit
            return hit
        while len(self._items) >= self.capacity:
            self._items.popitem(last=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.loads += 1
        try:
            value: Any = load_checkpoint(path, kind, backend, device, compute_dtype(device, kind, path))
        except Exception as e:  # cached: the same worker fails this checkpoint's next items at once
            value = e
        self._items[key] = value
        if isinstance(value, BaseException):
            raise value
        return value

    def keep_only(self, path: str) -> None:
        """Drop every model but ``path``'s (before a memory measurement)."""
        for key in [k for k in self._items if k[0] != path]:
            del self._items[key]
