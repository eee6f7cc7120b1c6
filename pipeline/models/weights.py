"""Lazy access to a model's weights, one tensor at a time: the driver never holds a whole model.

``WeightSource`` is the seam between where weights come from (a safetensors folder, or — for
scale tests — deterministic synthetic tensors generated where they are needed) and everything
that reads them (layer builders, search actors, the checkpoint writer). All names are *module
names* of the transformers 5 class (``model.language_model.layers.0.self_attn.q_proj.weight``),
whatever layout the files on disk use.
"""

from __future__ import annotations

import abc
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import VlmqError


class WeightSource(abc.ABC):
    """Read-only, lazily materialized weights of one model."""

    #: folder with config.json and processor/tokenizer files to copy into an output checkpoint,
    #: or None when there is none (synthetic models).
    model_dir: Path | None = None

    @property
    @abc.abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The parsed config.json."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every tensor name (module-name convention), in a stable order."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def dtype(self, name: str) -> torch.dtype: ...

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One tensor, materialized on CPU (memory-mapped where the backend allows)."""

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with ``prefix``, keyed by the full name."""
        return {k: self.get(k) for k in self.keys() if k.startswith(prefix)}

    def nbytes(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n * torch.empty((), dtype=self.dtype(name)).element_size()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)


# -- safetensors folders -------------------------------------------------------------------------

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _corrupt(path: Path, why: str) -> VlmqError:
    return VlmqError(
        f"corrupt safetensors file {path}: {why}",
        "re-download or re-copy this file from the original checkpoint (compare its size and sha256)",
    )


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """Parse and check one file's header: {tensor: (dtype, shape, (begin, end))}. Reads no tensor data.

    Checks what a truncated or overwritten file breaks: header length, JSON, dtype names, offsets
    inside the file, and ``end - begin`` equal to the bytes the shape and dtype need.
    """
    size = path.stat().st_size
    if size < 8:
        raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"entry {key!r} lacks dtype/shape/data_offsets") from None
        if dt not in _ST_DTYPES:
            raise _corrupt(path, f"entry {key!r} has unknown dtype {dt!r}")
        numel = 1
        for d in shape:
            numel *= d
        need = numel * torch.empty((), dtype=_ST_DTYPES[dt]).element_size()
        if not (0 <= begin <= end <= data_len) or end - begin != need:
            raise _corrupt(path, f"entry {key!r} points outside the file or has the wrong byte count "
                                 f"(offsets {begin}..{end}, data {data_len} bytes, needs {need})")
        out[key] = (dt, shape, (int(begin), int(end)))
    return out


class SafetensorsSource(WeightSource):
    """A model folder of safetensors files (sharded with an index, or single), opened lazily.

    Every header is read and checked up front (cheap: no tensor data); tensors are read one at a
    time through ``safe_open`` (memory-mapped). Names are module names: on-disk keys go through
    the adapter's ``checkpoint_key_rules``.
    """

    def __init__(self, model_dir: str | Path, adapter: Any = None):
        d = Path(model_dir)
        self.model_dir = d
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            raise VlmqError(f"no config.json in {d}", "pass the folder of a transformers checkpoint")
        try:
            self._config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VlmqError(f"{cfg_file} is not valid JSON ({e})", "restore config.json from the checkpoint") from None
        if adapter is None:
            from . import detect_adapter

            adapter = detect_adapter(self._config)
        self.adapter = adapter
        files, weight_map = _safetensors_files(d)
        self._disk: dict[str, tuple[Path, str]] = {}  # module name -> (file, on-disk key)
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in files:
            header = read_safetensors_header(f)
            listed = [k for k, v in weight_map.items() if v == f.name and k not in header]
            if listed:
                raise VlmqError(f"{d / 'model.safetensors.index.json'} places {listed[0]!r} in {f.name}, "
                                f"which does not hold it ({len(listed)} such keys)",
                                "the index and the shards come from different checkpoints; re-copy both")
            for key, (dt, shape, _) in header.items():
                name = adapter.module_key(key)
                if name in self._disk:
                    other = self._disk[name][1]
                    raise VlmqError(f"two tensors in {d} map to {name}: {other!r} and {key!r}",
                                    "the folder mixes two checkpoint layouts; keep one set of files")
                self._disk[name] = (f, key)
                self._meta[name] = (_ST_DTYPES[dt], shape)
        self._keys = sorted(self._disk)
        self._handles: dict[Path, Any] = {}

    @property
    def config_dict(self) -> dict[str, Any]:
        return self._config

    def keys(self) -> list[str]:
        return list(self._keys)

    def _check(self, name: str) -> None:
        if name not in self._meta:
            raise KeyError(f"{name!r} is not a tensor of {self.model_dir}")

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self._meta[name][0]

    def disk_key(self, name: str) -> str:
        """The key this tensor has inside its file."""
        self._check(name)
        return self._disk[name][1]

    def get(self, name: str) -> torch.Tensor:
        self._check(name)
        path, key = self._disk[name]
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return h.get_tensor(key)


def _safetensors_files(d: Path) -> tuple[list[Path], dict[str, str]]:
    """The weight files of a folder (those the index names, else every *.safetensors) and the
    index's weight_map ({} without an index)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise VlmqError(f"{index} is not a valid safetensors index (no weight_map)",
                            "restore the index file from the original checkpoint") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise VlmqError(f"{index} names files that are not in {d}: {', '.join(missing[:5])}",
                            "copy every shard of the checkpoint into the folder")
        files = [d / n for n in names]
        extra = sorted(p.name for p in d.glob("*.safetensors") if p.name not in set(names))
        if extra:
            raise VlmqError(f"{d} holds safetensors files the index does not name: {', '.join(extra[:5])}",
                            "remove stray shards (or restore the index that names them)")
        return files, dict(weight_map)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise VlmqError(
                f"{d} has only pickled weights ({', '.join(pickles[:3])}); vlmq refuses pickles by default "
                "because loading them can run arbitrary code",
                "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its source",
            )
        raise VlmqError(f"no *.safetensors weights in {d}", "pass the folder of a safetensors checkpoint")
    return files, {}


class PickleSource(WeightSource):
    """Pickled ``.bin``/``.pt`` shards, only when the user allowed pickles by flag.

    Loaded with ``torch.load(weights_only=True, mmap=True)`` shard by shard on first use.
    """

    def __init__(self, model_dir: str | Path, adapter: Any = None):
        d = Path(model_dir)
        self.model_dir = d
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            raise VlmqError(f"no config.json in {d}", "pass the folder of a transformers checkpoint")
        self._config = json.loads(cfg_file.read_text())
        if adapter is None:
            from . import detect_adapter

            adapter = detect_adapter(self._config)
        self.adapter = adapter
        self._files = sorted(p for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if not self._files:
            raise VlmqError(f"no weights in {d}", "pass the folder of a transformers checkpoint")
        self._where: dict[str, tuple[Path, str]] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for f in self._files:
            for key in self._load(f):
                self._where[self.adapter.module_key(key)] = (f, key)

    def _load(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._loaded:
            self._loaded[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return self._loaded[f]

    @property
    def config_dict(self) -> dict[str, Any]:
        return self._config

    def keys(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        f, key = self._where[name]
        return self._load(f)[key]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype


class UntiedHeadSource(WeightSource):
    """A model with tied embeddings, read as if it were untied: ``head_key`` (the lm_head weight)
    reads as a copy of ``embed_key`` and ``config.json`` says ``tie_word_embeddings: false``.

    Why: a packed lm_head cannot share its tensor with the fp16 embedding table (an embedding
    lookup needs dense rows). Written through this view, a checkpoint holds the embeddings in
    fp16 and its own quantized lm_head, and loaders do not tie them back together.
    """

    def __init__(self, base: WeightSource, head_key: str, embed_key: str, text_config_attr: str = "text_config"):
        self.base, self.head_key, self.embed_key = base, head_key, embed_key
        self.model_dir = base.model_dir
        config = json.loads(json.dumps(base.config_dict))  # a deep copy of plain JSON
        config["tie_word_embeddings"] = False
        for v in config.values():  # sub-configs that say it themselves
            if isinstance(v, dict) and "tie_word_embeddings" in v:
                v["tie_word_embeddings"] = False
        if isinstance(config.get(text_config_attr), dict):
            config[text_config_attr]["tie_word_embeddings"] = False
        self._config = config
        base_keys = base.keys()
        self._keys = base_keys if head_key in base_keys else [*base_keys, head_key]

    @property
    def config_dict(self) -> dict[str, Any]:
        return self._config

    def keys(self) -> list[str]:
        return list(self._keys)

    def _src(self, name: str) -> str:
        # tied means the embedding table *is* the head, even where a file also stores a copy
        return self.embed_key if name == self.head_key else name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(self._src(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(self._src(name))

    def get(self, name: str) -> torch.Tensor:
        return self.base.get(self._src(name))


def open_source(path: str | Path, allow_pickle: bool = False, adapter: Any = None) -> WeightSource:
    """Open a model folder lazily. Raises ``VlmqError`` for a missing path, a corrupt header, or a
    pickle-only folder (unless ``allow_pickle``), before any tensor is read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VlmqError(f"model path {p} does not exist",
                        "pass a folder with config.json and *.safetensors, or --model builtin")
    if p.is_file():
        raise VlmqError(f"model path {p} is a file", "pass the folder that holds config.json and the weights")
    has_st = (p / "model.safetensors.index.json").is_file() or any(p.glob("*.safetensors"))
    if not has_st and allow_pickle and any(q.suffix in _PICKLE_SUFFIXES for q in p.iterdir()):
        return PickleSource(p, adapter)
    return SafetensorsSource(p, adapter)
