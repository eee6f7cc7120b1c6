"""The activation store: each decoder layer's fp input hidden states, one Arrow IPC stream per layer.

Capture writes, search reads, and both may run in many processes (Ray actors) on many nodes, so
all state lives in files under ``root`` (a local directory or any pyarrow filesystem URI, e.g.
``s3://bucket/job/acts`` for shared storage); an :class:`ActivationStore` object is only a handle
and pickles cheaply.

Files under ``root``::

    layer_0007.arrow                      complete stream (appears only by an atomic move at close)
    layer_0007.arrow.tmp-<token>          the stream while one writer writes it
    layer_0007.arrow.w-<token>.<bytes>    that writer's marker: bytes written so far, mtime = heartbeat
    meta/sample_<id>.safetensors          per-sample kwargs every layer shares (put_meta/get_meta)

A stream row is ``(sample_id int64, data binary, shape list<int32>, dtype string)``: ``data`` holds
the tensor's raw bytes, so every dtype (bf16 included) round-trips exactly. Rows are written in
record batches of ``chunk_rows`` rows (or fewer when ``chunk_bytes`` is reached first).

States of a layer (:meth:`ActivationStore.layer_state`): ``complete`` (the final file exists),
``writing`` (a marker refreshed within ``stale_after`` seconds), ``stale`` (only markers older than
that: the writer crashed or was lost; :meth:`delete` cleans it up before a retry), ``absent``.

Byte budget: with ``max_bytes`` set, a writer waits before each chunk until
``bytes_used() + chunk`` fits, i.e. until searches have deleted finished layers. Writers in
different processes check independently, so the budget may be exceeded by at most one chunk per
concurrent writer. Waiting longer than ``wait_timeout`` raises a :class:`VlmqError`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import VlmqError

ROW_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("data", pa.binary()),
        ("shape", pa.list_(pa.int32())),
        ("dtype", pa.string()),
    ]
)
BUDGET_FIX = "raise --store-max-gb (resources.store_max_gb in the job YAML), or run more search workers so finished layers are deleted sooner"

_NAME = re.compile(r"^layer_(\d+)\.arrow(?:\.(tmp|w)-([0-9a-f]+)(?:\.(\d+))?)?$")
_META_KEY = "vlmq.structure"


def open_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local directory or a pyarrow filesystem URI."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def tensor_to_bytes(t: torch.Tensor) -> tuple[np.ndarray, list[int], str]:
    """Raw little-endian bytes (a uint8 view, no copy for a CPU tensor), shape and dtype name of a
    tensor (any dtype, any device)."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return raw, list(t.shape), str(t.dtype).removeprefix("torch.")


def _binary_array(raws: list[np.ndarray]) -> pa.Array:
    """One Arrow binary array from byte views with a single copy (``pa.array`` of Python bytes
    needed a ``tobytes`` copy first, then copied again)."""
    offsets = np.zeros(len(raws) + 1, dtype=np.int64)
    np.cumsum([r.size for r in raws], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"an activation chunk of {offsets[-1]} bytes is over Arrow's 2 GiB binary limit")
    data = np.concatenate(raws) if raws else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(pa.binary(), len(raws), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                           pa.py_buffer(data)])


def tensor_from_bytes(data: bytes | pa.Buffer, shape: list[int], dtype: str) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; the result owns its (writable) memory."""
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} in activation store")
    flat = np.frombuffer(data, dtype=np.uint8).copy()
    if flat.size == 0:
        return torch.empty(shape, dtype=dt)
    return torch.from_numpy(flat).view(dt).reshape(shape)


class LayerWriter:
    """Appends ``(sample_id, tensor)`` rows to one layer's stream; ``close()`` publishes it atomically.

    One writer per layer at a time. Not picklable (it holds an open stream): create it where the
    data is produced. Used as a context manager, an exception aborts (removes the partial stream).
    """

    def __init__(self, store: ActivationStore, layer: int):
        self.store, self.layer = store, layer
        self.token = uuid.uuid4().hex[:16]
        self._marker: str | None = None
        self._rows: list[tuple[int, np.ndarray, list[int], str]] = []
        self._buf_bytes = 0
        self.rows_written = 0
        self.closed = False
        self._set_marker(0)
        self._tmp = store._path(f"{store.layer_name(layer)}.tmp-{self.token}")
        self._sink = store.fs.open_output_stream(self._tmp)
        self._writer = pa.ipc.new_stream(self._sink, ROW_SCHEMA)

    def _set_marker(self, nbytes: int) -> None:
        """Create the new marker before removing the old: a reader may count both, never neither."""
        name = self.store._path(f"{self.store.layer_name(self.layer)}.w-{self.token}.{int(nbytes)}")
        with self.store.fs.open_output_stream(name) as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode())
        if self._marker is not None and self._marker != name:
            _delete_file(self.store.fs, self._marker)
        self._marker = name

    def append(self, sample_id: int, tensor: torch.Tensor) -> None:
        """Buffer one row; a full chunk is written (waiting for budget if needed)."""
        if self.closed:
            raise RuntimeError(f"writer of layer {self.layer} is closed")
        raw, shape, dtype = tensor_to_bytes(tensor)
        self._rows.append((int(sample_id), raw, shape, dtype))
        self._buf_bytes += len(raw)
        if len(self._rows) >= self.store.chunk_rows or self._buf_bytes >= self.store.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one record batch."""
        if not self._rows:
            return
        ids, data, shapes, dtypes = zip(*self._rows)
        batch = pa.record_batch(
            [
                pa.array(ids, pa.int64()),
                _binary_array(list(data)),
                pa.array(shapes, pa.list_(pa.int32())),
                pa.array(dtypes, pa.string()),
            ],
            schema=ROW_SCHEMA,
        )
        self.store.wait_for_room(batch.nbytes, heartbeat=lambda: self._set_marker(self._sink.tell()))
        self._writer.write_batch(batch)
        self.rows_written += len(ids)
        self._rows, self._buf_bytes = [], 0
        self._set_marker(self._sink.tell())

    def close(self) -> None:
        """Flush, end the stream, and publish it by an atomic move: now ``is_complete`` is True."""
        if self.closed:
            return
        self.flush()
        self._writer.close()
        self._sink.close()
        if isinstance(self.store.fs, pafs.LocalFileSystem):
            _fsync(self._tmp)
        self.store.fs.move(self._tmp, self.store._path(self.store.layer_name(self.layer)))
        if self._marker:
            _delete_file(self.store.fs, self._marker)
        self.closed = True

    def abort(self) -> None:
        """Drop the partial stream (its bytes stop counting against the budget)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._writer.close()
            self._sink.close()
        except Exception:
            pass
        for p in (self._tmp, self._marker):
            if p:
                _delete_file(self.store.fs, p)

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ActivationStore:
    """Handle on a store root; see the module docstring for the file layout and semantics."""

    def __init__(
        self,
        root: str,
        *,
        max_bytes: int | None = None,
        chunk_rows: int = 8,
        chunk_bytes: int = 256 * 2**20,
        wait_timeout: float = 1800.0,
        poll_interval: float = 0.2,
        stale_after: float = 600.0,
    ):
        if max_bytes is not None and max_bytes <= 0:
            raise VlmqError(f"activation store budget must be positive, got {max_bytes} bytes", BUDGET_FIX)
        self.root = str(root)
        self.fs, self.base = open_filesystem(self.root)
        self.max_bytes = max_bytes
        self.chunk_rows = max(1, int(chunk_rows))
        self.chunk_bytes = int(chunk_bytes)
        self.wait_timeout = float(wait_timeout)
        self.poll_interval = float(poll_interval)
        self.stale_after = float(stale_after)
        self.fs.create_dir(self._path("meta"), recursive=True)

    # -------------------------------------------------------------- paths and listing

    def _path(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    @staticmethod
    def layer_name(layer: int) -> str:
        return f"layer_{int(layer):04d}.arrow"

    def _entries(self) -> list[tuple[int, str | None, int, pafs.FileInfo]]:
        """(layer, kind None|'tmp'|'w', marker bytes, info) for every layer file under root."""
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True)):
            m = _NAME.match(info.base_name)
            if m and info.type == pafs.FileType.File:
                out.append((int(m.group(1)), m.group(2), int(m.group(4) or 0), info))
        return out

    # -------------------------------------------------------------- layers

    def writer(self, layer: int) -> LayerWriter:
        """A new writer for ``layer``'s stream (call :meth:`delete` first to redo a layer)."""
        return LayerWriter(self, layer)

    def is_complete(self, layer: int) -> bool:
        return self.fs.get_file_info(self._path(self.layer_name(layer))).type == pafs.FileType.File

    def layer_state(self, layer: int) -> str:
        """``complete`` | ``writing`` | ``stale`` (writer gone) | ``absent``."""
        if self.is_complete(layer):
            return "complete"
        markers = [info for lay, kind, _, info in self._entries() if lay == layer and kind == "w"]
        if not markers:
            return "absent"
        now = datetime.now(timezone.utc)
        fresh = any(i.mtime is None or (now - i.mtime).total_seconds() < self.stale_after for i in markers)
        return "writing" if fresh else "stale"

    def layer_bytes(self, layer: int) -> int:
        """Size of a complete layer's stream (0 when it is not complete)."""
        info = self.fs.get_file_info(self._path(self.layer_name(layer)))
        return int(info.size or 0) if info.type == pafs.FileType.File else 0

    def complete_layers(self) -> list[int]:
        return sorted(lay for lay, kind, _, _ in self._entries() if kind is None)

    def iter_layer(self, layer: int, chunk_rows: int = 8) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """Stream a complete layer in lists of up to ``chunk_rows`` rows, one record batch in memory."""
        if not self.is_complete(layer):
            raise RuntimeError(f"layer {layer} of activation store {self.root} is {self.layer_state(layer)}, not complete")
        chunk: list[tuple[int, torch.Tensor]] = []
        with self.fs.open_input_stream(self._path(self.layer_name(layer))) as f:
            for batch in pa.ipc.open_stream(f):
                ids = batch.column(0).to_pylist()
                data, shapes, dtypes = batch.column(1), batch.column(2).to_pylist(), batch.column(3).to_pylist()
                for j, sid in enumerate(ids):
                    chunk.append((sid, tensor_from_bytes(data[j].as_buffer(), shapes[j], dtypes[j])))
                    if len(chunk) >= chunk_rows:
                        yield chunk
                        chunk = []
        if chunk:
            yield chunk

    def delete(self, layer: int) -> None:
        """Remove a layer: its complete stream and any partial one left by a lost writer.

        Do not delete a layer that a live writer is still writing: its ``close()`` would fail.
        """
        for lay, _, _, info in self._entries():
            if lay == layer:
                _delete_file(self.fs, info.path)

    def bytes_used(self) -> int:
        """Complete streams + bytes reported by live writers' markers + meta files."""
        total = 0
        for _, kind, nbytes, info in self._entries():
            if kind is None:
                total += int(info.size or 0)
            elif kind == "w":
                total += nbytes
        for info in self.fs.get_file_info(pafs.FileSelector(self._path("meta"), allow_not_found=True)):
            if info.type == pafs.FileType.File:
                total += int(info.size or 0)
        return total

    def wait_for_room(self, nbytes: int, heartbeat: Callable[[], None] | None = None) -> None:
        """Block until ``nbytes`` more fit in the budget; raise VlmqError after ``wait_timeout``."""
        if self.max_bytes is None:
            return
        if nbytes > self.max_bytes:
            raise VlmqError(
                f"one activation chunk ({nbytes} bytes) is larger than the store budget ({self.max_bytes} bytes)",
                BUDGET_FIX,
            )
        t0 = last_beat = time.monotonic()
        while True:
            used = self.bytes_used()
            if used + nbytes <= self.max_bytes:
                return
            now = time.monotonic()
            if now - t0 > self.wait_timeout:
                raise VlmqError(
                    f"activation store {self.root} stayed full for {self.wait_timeout:.0f}s "
                    f"({used} of {self.max_bytes} bytes used, {nbytes} more needed)",
                    BUDGET_FIX,
                )
            if heartbeat is not None and now - last_beat > min(30.0, self.stale_after / 4):
                heartbeat()
                last_beat = now
            time.sleep(self.poll_interval)

    def destroy(self) -> None:
        """Remove the whole store (every layer and all meta)."""
        self.fs.delete_dir(self.base)

    # -------------------------------------------------------------- per-sample meta

    def _meta_path(self, sample_id: int) -> str:
        return self._path(f"meta/sample_{int(sample_id)}.safetensors")

    def put_meta(self, sample_id: int, kwargs: dict[str, Any]) -> None:
        """Store what every layer shares for one sample (tensors, tuples, lists, dicts, None, scalars)."""
        blob = encode_meta(kwargs)
        path = self._meta_path(sample_id)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(blob)
        self.fs.move(tmp, path)

    def get_meta(self, sample_id: int) -> dict[str, Any]:
        path = self._meta_path(sample_id)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise KeyError(f"no meta for sample {sample_id} in activation store {self.root}")
        with self.fs.open_input_stream(path) as f:
            return decode_meta(f.read())

    def has_meta(self, sample_id: int) -> bool:
        return self.fs.get_file_info(self._meta_path(sample_id)).type == pafs.FileType.File


# ------------------------------------------------------------------ meta encoding


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None:
        return {"none": 1}
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return {"list": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("meta dict keys must be strings")
        return {"dict": {k: _encode(v, tensors) for k, v in obj.items()}}
    if isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} in activation-store meta (tensors, tuples, lists, dicts, None, scalars)")


def _decode(desc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "none" in desc:
        return None
    if "tensor" in desc:
        return tensors[desc["tensor"]]
    if "tuple" in desc:
        return tuple(_decode(v, tensors) for v in desc["tuple"])
    if "list" in desc:
        return [_decode(v, tensors) for v in desc["list"]]
    if "dict" in desc:
        return {k: _decode(v, tensors) for k, v in desc["dict"].items()}
    return desc["value"]


def encode_meta(kwargs: dict[str, Any]) -> bytes:
    """safetensors bytes whose header metadata holds the JSON structure of ``kwargs``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(dict(kwargs), tensors)
    return st_save(tensors, metadata={_META_KEY: json.dumps(structure)})


def decode_meta(blob: bytes) -> dict[str, Any]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    structure = json.loads(header["__metadata__"][_META_KEY])
    return _decode(structure, st_load(bytes(blob)))


# ------------------------------------------------------------------ helpers


def _delete_file(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # some filesystems report a missing file as a generic OSError
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise e


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
