"""Local evaluation files (JSONL or Parquet), read a slice at a time; no downloads.

Images use the calibration sources' rules (``data.sources.decode_image``): ``image`` as encoded
bytes, a ``{"bytes", "path"}`` struct or a path; or ``image_path``; paths relative to the file's
folder. The row schemas of each task are in ``pipeline/evaluate/tasks/__init__.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import VlmqError

FORMATS = (".jsonl", ".parquet")


def check_file(path: str, what: str, required: list[tuple[str, ...]]) -> int:
    """Cheap driver-side check: the file exists, has a known format, and its columns (Parquet
    schema, or the keys of the first JSONL record) cover each group of ``required`` (one of each
    tuple). Returns the number of rows."""
    p = Path(path)
    if not p.is_file():
        raise VlmqError(f"{what} file {path} does not exist", f"pass a {' or '.join(FORMATS)} file")
    if p.suffix.lower() not in FORMATS:
        raise VlmqError(f"{what} file {path}: unknown format {p.suffix!r}", f"use a {' or '.join(FORMATS)} file")
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(p)
        except Exception as e:
            raise VlmqError(f"{path} is not a readable Parquet file ({e})", "re-export the file") from None
        names, n = set(f.schema_arrow.names), f.metadata.num_rows
    else:
        lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
        n = len(lines)
        try:
            first = json.loads(lines[0]) if lines else {}
        except ValueError as e:
            raise VlmqError(f"{path}: line 1 is not JSON ({e})", "write one JSON object per line") from None
        names = set(first) if isinstance(first, dict) else set()
    if n == 0:
        raise VlmqError(f"{what} file {path} has no rows", "point at a file with examples")
    for group in required:
        if not names & set(group):
            raise VlmqError(f"{what} file {path} lacks a column {' / '.join(group)!r} (has {sorted(names)})",
                            "see the task formats in `vlmq eval --help`")
    return n


def read_slice(path: str, start: int, stop: int, cache: dict[str, Any] | None = None) -> list[dict[str, Any] | None]:
    """Records ``start..stop-1`` (None for a JSONL line that is not an object)."""
    key = f"rows:{path}"
    rows = cache.get(key) if cache is not None else None
    if rows is None:
        p = Path(path)
        if p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()
        else:
            rows = []
            for ln in p.read_text().splitlines():
                if not ln.strip():
                    continue
                try:
                    rec = json.loads(ln)
                except ValueError:
                    rec = None
                rows.append(rec if isinstance(rec, dict) else None)
        if cache is not None:
            cache[key] = rows
    return rows[start:stop]


def image_of(rec: dict[str, Any], root: Path) -> tuple[Any, str | None]:
    """(PIL image or None, problem or None); a row without any image field is text-only."""
    from ...data.sources import decode_image

    value = rec.get("image")
    if value is None or (isinstance(value, str) and not value.strip()):
        value = rec.get("image_path")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    return decode_image(value, root)


def first(rec: dict[str, Any], *names: str) -> Any:
    for n in names:
        v = rec.get(n)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    return None
