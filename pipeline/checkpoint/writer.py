"""Gather: quantized Linears + untouched source tensors -> a compressed-tensors checkpoint.

Output (METHODS.md §6): ``model-0000i-of-0000n.safetensors`` shards and
``model.safetensors.index.json``, ``config.json`` with ``quantization_config``, vlmq's own
``vlmq.json`` (method, recipe, version), the source's processor/tokenizer/chat-template files,
any extra files, and ``manifest.json`` (sha256 + size of every file, ``complete: true``) LAST.

Crash safety: everything is written into a hidden staging directory beside ``out_dir`` and
renamed into place only after the manifest is durable. An exception removes the staging
directory; a hard kill leaves a hidden ``.<name>.vlmq-staging-*`` directory, never ``out_dir``.

Streaming: tensors are produced in source order and flushed shard by shard, so at most one
shard (plus one tensor read lazily from a part file) is in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..errors import VlmqError
from ..models.weights import WeightSource
from ..quant.quantizer import QuantizedWeight, QuantScheme
from .layout import compress_weight, expected_layout, quantization_config, st_dtype
from .loader import INDEX_NAME
from .parts import PartIndex, fsync_dir, fsync_file, read_part_index

MANIFEST_NAME = "manifest.json"
VLMQ_META_NAME = "vlmq.json"
MANIFEST_FORMAT = "vlmq-checkpoint/1"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
_GENERATED = {"config.json", INDEX_NAME, MANIFEST_NAME, VLMQ_META_NAME}


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, protect: Iterable[os.PathLike] = ()) -> Path:
    """Refuse a target that would lose user data. Cheap: call it before any model work.

    A non-empty directory needs ``overwrite=True``; even then, a directory that contains the
    current working directory or any ``protect`` path (the source model) is refused.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise VlmqError(f"output path {out} exists and is not a directory", "choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise VlmqError(
                f"output directory {out} is not empty", "choose an empty or new --out, or pass --overwrite to replace it"
            )
        resolved = out.resolve()
        for p in [Path.cwd(), *protect]:
            p = Path(p).resolve()
            if p == resolved or resolved in p.parents:
                raise VlmqError(
                    f"refusing to overwrite {out}: it contains {p}", "choose an output directory of its own"
                )
    return out


# ----------------------------------------------------------------------------- what goes in


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass
class _Unit:
    """Tensors that travel together into one shard (a quantized Linear's 3-4 tensors, or one tensor)."""

    names: list[str]
    nbytes: int
    load: Callable[[], dict[str, torch.Tensor]]


class _QuantizedInput:
    """Quantized Linears from an in-memory mapping or from part files, behind one interface."""

    def __init__(self, quantized: Mapping[str, QuantizedWeight] | Iterable[str | os.PathLike]):
        if isinstance(quantized, (str, os.PathLike)):
            quantized = [quantized]
        self.schemes: dict[str, QuantScheme] = {}
        self.replaced_from_parts: dict[str, Path] = {}
        self._mapping: Mapping[str, QuantizedWeight] | None = None
        self._parts: dict[str, PartIndex] = {}
        if isinstance(quantized, Mapping):
            self._mapping = quantized
            self.schemes = {k: v.scheme for k, v in quantized.items()}
            return
        for p in quantized:
            index = read_part_index(p)
            for m, s in index.schemes.items():
                if m in self.schemes:
                    raise VlmqError(f"{m} is quantized in two part files (second: {p})", "gather one result per block")
                self.schemes[m] = s
                self._parts[m] = index
            for name in index.replaced:
                if name in self.replaced_from_parts:
                    raise VlmqError(f"{name} is replaced in two part files (second: {p})", "gather one result per block")
                self.replaced_from_parts[name] = index.path

    def shape(self, module: str) -> tuple[int, int] | None:
        """The dense shape a part file declares, or the QuantizedWeight's shape."""
        if self._mapping is not None:
            return self._mapping[module].shape
        with safe_open(str(self._parts[module].path), framework="pt") as f:
            return tuple(int(x) for x in f.get_tensor(f"{module}.weight_shape").tolist())  # type: ignore[return-value]

    def stored_layout(self, module: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self._mapping is not None:
            qw = self._mapping[module]
            spec = expected_layout(*qw.shape, qw.scheme)
            return {k: (shape, dt or qw.scale.dtype) for k, (shape, dt) in spec.items()}
        out = {}
        with safe_open(str(self._parts[module].path), framework="pt") as f:
            for k in f.keys():
                if k.startswith(module + ".weight_"):
                    sl = f.get_slice(k)
                    out[k[len(module) + 1 :]] = (tuple(sl.get_shape()), st_dtype(sl.get_dtype()))
        return out

    def load(self, module: str) -> dict[str, torch.Tensor]:
        if self._mapping is not None:
            return {f"{module}.{k}": v for k, v in compress_weight(self._mapping[module]).items()}
        layout = self.stored_layout(module)
        with safe_open(str(self._parts[module].path), framework="pt") as f:
            return {f"{module}.{k}": f.get_tensor(f"{module}.{k}") for k in layout}


def _cast(load: Callable[[], dict[str, torch.Tensor]], dtype: torch.dtype | None) -> Callable[[], dict[str, torch.Tensor]]:
    if dtype is None:
        return load
    return lambda: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load().items()}


def _plan_units(
    source: WeightSource, qin: _QuantizedInput, replaced: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> list[_Unit]:
    """Every output tensor in source order, checked against the source before anything is written."""
    keys = source.keys()
    key_set = set(keys)
    for m, s in qin.schemes.items():
        w = f"{m}.weight"
        if w not in key_set:
            raise VlmqError(f"quantized module {m} has no {w} in the source model", "the result belongs to another model")
        src_shape = tuple(source.shape(w))
        got = qin.shape(m)
        if src_shape != tuple(got):
            raise VlmqError(f"{m}: quantized shape {tuple(got)} != source shape {src_shape}", "the result belongs to another model")
        layout = qin.stored_layout(m)
        want = expected_layout(*src_shape, s)
        for suffix, (shape, dt) in want.items():
            if suffix not in layout or layout[suffix][0] != shape or (dt is not None and layout[suffix][1] != dt):
                raise VlmqError(f"{m}.{suffix}: stored {layout.get(suffix)} != expected {(shape, dt)}", "re-run the block")
    all_replaced = set(replaced) | set(qin.replaced_from_parts)
    overlap = set(replaced) & set(qin.replaced_from_parts)
    if overlap:
        raise VlmqError(f"tensors replaced twice (mapping and part): {sorted(overlap)[:5]}", "pass each once")
    for name in all_replaced:
        if name not in key_set:
            raise VlmqError(f"replaced tensor {name} is not in the source model", "the result belongs to another model")
        if name.endswith(".weight") and name[: -len(".weight")] in qin.schemes:
            raise VlmqError(f"{name} is both replaced and quantized", "fold into the weight before quantizing")
        if name in replaced and tuple(replaced[name].shape) != tuple(source.shape(name)):
            raise VlmqError(f"replaced {name}: shape {tuple(replaced[name].shape)} != {tuple(source.shape(name))}", "")

    units: list[_Unit] = []
    for k in keys:
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        if mod is not None and mod in qin.schemes:
            layout = qin.stored_layout(mod)
            units.append(
                _Unit([f"{mod}.{s}" for s in layout], sum(_nbytes(*v) for v in layout.values()), lambda m=mod: qin.load(m))
            )
        else:
            if k in replaced:
                load, src_dtype = (lambda k=k: {k: replaced[k]}), source.dtype(k)
            elif k in qin.replaced_from_parts:
                load, src_dtype = (lambda k=k, p=qin.replaced_from_parts[k]: {k: _read_one(p, k)}), source.dtype(k)
            else:
                load, src_dtype = (lambda k=k: {k: source.get(k)}), source.dtype(k)
            out_dtype = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype
            # a replaced tensor (a folded norm, computed in fp32) is stored in the dtype of the
            # tensor it replaces, like every untouched tensor
            units.append(_Unit([k], _nbytes(source.shape(k), out_dtype), _cast(load, out_dtype)))
    return units


def _set_config_dtype(config: dict[str, Any], dtype: torch.dtype) -> None:
    """Point config.json's dtype fields (top level and sub-configs) at the stored dtype."""
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    for v in config.values():
        if isinstance(v, dict) and ("dtype" in v or "torch_dtype" in v):
            for key in ("dtype", "torch_dtype"):
                if key in v:
                    v[key] = name


def _read_one(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


# ----------------------------------------------------------------------------- writing


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path]) -> dict[Path, str]:
    """sha256 of many files at once: hashlib and file reads release the GIL, so a checkpoint's
    shards hash in parallel (a 7B W3 checkpoint is ~6 GB: ~4 s on one core at ~1.5 GB/s)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    if len(paths) <= 1:
        return {p: sha256_file(p) for p in paths}
    big_first = sorted(paths, key=lambda p: -p.stat().st_size)  # the longest hash starts first
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return dict(zip(big_first, pool.map(sha256_file, big_first)))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_shards(staging: Path, units: list[_Unit], max_shard_bytes: int,
                  on_written: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write the shards, calling ``on_written(path)`` as each is on disk (the writer starts its
    sha256 there, in the background, while the next shard is built)."""
    shards: list[list[_Unit]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    n = len(shards)
    wmap: dict[str, str] = {}
    total = 0
    for i, group in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for u in group:
            got = u.load()
            if sorted(got) != sorted(u.names):
                raise RuntimeError(f"unit produced {sorted(got)}, planned {sorted(u.names)}")
            for name, t in got.items():
                tensors[name] = t.detach().cpu().contiguous()
                total += t.numel() * t.element_size()
                wmap[name] = fname
        save_file(tensors, str(staging / fname), metadata={"format": "pt"})
        fsync_file(staging / fname)
        del tensors
        if on_written is not None:
            on_written(staging / fname)
    return {"metadata": {"total_size": total}, "weight_map": wmap}


def _copy_model_files(model_dir: Path | None, staging: Path) -> list[str]:
    """Processor, tokenizer, chat template, generation config...: top-level non-weight files."""
    if model_dir is None:
        return []
    copied = []
    for p in sorted(Path(model_dir).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in _GENERATED:
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        shutil.copyfile(p, staging / p.name)
        fsync_file(staging / p.name)
        copied.append(p.name)
    return copied


def _safe_relpath(rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise VlmqError(f"extra file path {rel!r} must be relative and stay inside the checkpoint", "")
    if str(p) in _GENERATED or p.name.endswith(".safetensors") and len(p.parts) == 1:
        raise VlmqError(f"extra file {rel!r} would overwrite a generated file", "rename it")
    return p


def write_manifest(directory: Path, known: Mapping[Path, Any] | None = None) -> dict[str, Any]:
    """Hash every file under ``directory`` (except the manifest itself) and write the manifest.
    ``known``: path -> sha256 (or a future of it) already computed for files written earlier."""
    known = dict(known or {})
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME]
    hashes = sha256_files(p for p in paths if p not in known)
    hashes.update({p: h if isinstance(h, str) else h.result() for p, h in known.items()})
    files = {p.relative_to(directory).as_posix(): {"sha256": hashes[p], "size": p.stat().st_size} for p in paths}
    manifest = {"format": MANIFEST_FORMAT, "complete": True, "vlmq_version": __version__, "files": files}
    _write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def write_checkpoint(
    out_dir: str | os.PathLike,
    source: WeightSource,
    quantized: Mapping[str, QuantizedWeight] | Iterable[str | os.PathLike],
    replaced: Mapping[str, torch.Tensor] | None = None,
    recipe_info: Mapping[str, Any] | None = None,
    ignore: Iterable[str] | None = None,
    *,
    act_bits: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, bytes | os.PathLike] | None = None,
    stage_hook: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    timings: dict[str, float] | None = None,
) -> Path:
    """Write a complete checkpoint to ``out_dir`` and return its path.

    ``quantized``: full module name -> QuantizedWeight, or part file paths (streamed).
    ``replaced``: full parameter name -> fp tensor substituted for the source's.
    ``ignore``: unquantized Linears; None computes every Linear not quantized (meta model).
    ``act_bits=8``: W4A8, dynamic per-token int8 input activations in the config.
    ``dtype``: cast every unquantized floating tensor to it and say so in config.json
    (None: copy tensors bit for bit). Scales keep the QuantizedWeight's dtype.
    ``extra_files`` (relative path -> bytes or file) and ``stage_hook(staging_dir)`` add files
    (e.g. ``validation/reference.safetensors``) before the manifest, so they are hashed too.
    """
    protect = [source.model_dir] if source.model_dir is not None else []
    out = check_output_dir(out_dir, overwrite, protect)
    extras = {_safe_relpath(k): v for k, v in (extra_files or {}).items()}
    config = copy.deepcopy(source.config_dict)
    if config.get("quantization_config"):
        raise VlmqError("the source model is already quantized (config.json has quantization_config)", "start from the fp model")
    replaced = dict(replaced or {})
    qin = _QuantizedInput(quantized)
    if not qin.schemes:
        raise VlmqError("nothing to write: no quantized Linear", "check the recipe's targets")
    if ignore is None:
        from .loader import linear_module_names

        ignore = [n for n in linear_module_names(config) if n not in qin.schemes]
    ignore = sorted(set(ignore))
    both = [n for n in ignore if n in qin.schemes]
    if both:
        raise VlmqError(f"modules both ignored and quantized: {both[:5]}", "fix the ignore list")
    units = _plan_units(source, qin, replaced, dtype)
    if dtype is not None:
        _set_config_dtype(config, dtype)
    config["quantization_config"] = quantization_config(qin.schemes, ignore, act_bits)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.vlmq-staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    from concurrent.futures import ThreadPoolExecutor

    hasher = ThreadPoolExecutor(max_workers=2)
    early: dict[Path, Any] = {}  # shard path -> future of its sha256

    def hash_soon(path: Path) -> None:
        early[path] = hasher.submit(sha256_file, path)

    clock = _Clock(timings)
    try:
        index = _write_shards(staging, units, max_shard_bytes, hash_soon)
        clock("shards")
        _write_json(staging / INDEX_NAME, index)
        _write_json(staging / "config.json", config)
        copied = _copy_model_files(source.model_dir, staging)
        _write_json(staging / VLMQ_META_NAME, _vlmq_meta(recipe_info, qin.schemes, act_bits, copied))
        for rel, content in extras.items():
            if isinstance(content, (bytes, bytearray)):
                _write_bytes(staging / rel, bytes(content))
            else:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(content, staging / rel)
                fsync_file(staging / rel)
        if stage_hook is not None:
            stage_hook(staging)
        clock("extras")
        write_manifest(staging, early)
        clock("manifest")
        for d in [p for p in staging.rglob("*") if p.is_dir()] + [staging]:
            fsync_dir(d)
        _move_into_place(staging, out)
        clock("publish")
    except BaseException:
        hasher.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        hasher.shutdown(wait=True)
    return out


class _Clock:
    """Seconds since the last call, recorded under a name (when there is a dict to record into)."""

    def __init__(self, into: dict[str, float] | None):
        import time

        self.into, self._time = into, time.perf_counter
        self.t = self._time()

    def __call__(self, name: str) -> None:
        now = self._time()
        if self.into is not None:
            self.into[name] = round(now - self.t, 3)
        self.t = now


def _vlmq_meta(
    recipe_info: Mapping[str, Any] | None, schemes: Mapping[str, QuantScheme], act_bits: int | None, copied: list[str]
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for s in schemes.values():
        key = f"w{s.bits}g{s.group_size or 'channel'}{'sym' if s.symmetric else 'asym'}"
        counts[key] = counts.get(key, 0) + 1
    return {
        "vlmq_version": __version__,
        "created_unix": int(time.time()),
        "recipe": dict(recipe_info or {}),
        "act_bits": act_bits or 16,
        "quantized_linears": counts,
        "copied_model_files": copied,
    }


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename staging -> out; an existing (empty, or overwrite-approved) out is moved aside first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.vlmq-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(staging, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
