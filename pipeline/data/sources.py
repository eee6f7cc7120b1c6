"""Calibration sources: where (image, prompt, answer) rows come from, before any model is involved.

A source is opened from the user's ``--calib`` string with :func:`open_calib_source`. Opening is
cheap (schemas and metadata only, no image is decoded), so the job calls it first and every
problem with the data (missing file, unknown format, missing columns, no rows) is a
:class:`~pipeline.errors.VlmqError` before any model work.

Accepted ``--calib`` strings
----------------------------
- ``builtin`` or ``builtin:MODE`` (MODE = ``caption`` | ``qa`` | ``mixed``): the synthetic scenes of
  :mod:`pipeline.data.synthetic` (split ``calib``). ``caption`` (default, like MBQ's image-caption
  calibration) pairs each image with a describe-the-image prompt and its caption; ``qa`` uses the
  question and answer; ``mixed`` alternates (even row ids caption, odd row ids qa).
- ``PATH.parquet``: one row per sample.
- ``PATH.jsonl``: one JSON object per line (blank lines ignored; a line that is not a JSON object
  is an unusable row).
- ``DIR`` saved with ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: ``split=`` picks
  one, default ``train`` or the only split).
- Image paths in any format are relative to the image folder: ``image_root=`` (``--image-dir``)
  if given, else the folder holding the ``.parquet`` / ``.jsonl`` file, or the datasets folder.
- A ``file://`` prefix is accepted for local paths.

Accepted schema (Parquet columns, JSONL keys, datasets features)
----------------------------------------------------------------
- image, required; per row the first non-empty of:
    - ``image``: encoded image bytes (PNG/JPEG/...); or a struct/dict ``{"bytes": ..., "path": ...}``
      (the Hugging Face ``Image`` feature; ``bytes`` wins when both are set); or a string path
      (absolute, or relative to the image folder); or a decoded ``datasets`` image;
    - ``image_path``: a string path, as above.
- text, one of (per row the first non-empty of each pair wins):
    - ``prompt`` or ``question`` (the user turn) and ``answer`` or ``caption`` (the assistant turn);
    - ``caption`` (or ``answer``) alone: the prompt defaults to :data:`CAPTION_PROMPT`;
    - ``conversations``: a LLaVA / ShareGPT4V list ``[{"from": "human", "value": ...},
      {"from": "gpt", "value": ...}, ...]`` (``role``/``content`` keys also work); the first
      human turn is the prompt and the first assistant turn after it the answer.
- Literal ``<image>`` placeholders in the text are removed (the chat template places the image)
  and text is stripped. Other columns are ignored.

A row that cannot be used is still yielded, with ``reason`` set (see :data:`REASONS`), so that
collation can count it; rows are never dropped silently.

Sampling
--------
``rows()`` yields every row of the source in one seeded permutation order (numpy
``default_rng(seed).permutation(num_rows)``, seed 42 by default like the MBQ paper); the collator
takes the first ``num_samples`` usable ones, so an unusable row is replaced by the next one in the
permutation. Identical rows in different formats give identical sequences.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import VlmqError, nearest

CAPTION_PROMPT = "Describe this image."
MODES = ("caption", "qa", "mixed")
DEFAULT_SEED = 42
DEFAULT_NUM_SAMPLES = 128
FETCH_CHUNK = 32  # rows fetched (and images decoded) at a time while iterating

# Why a row is unusable: the keys of DataReport.skipped.
R_NO_IMAGE = "missing image"
R_IMAGE_FILE = "image file not found"
R_BAD_IMAGE = "unreadable image"
R_EMPTY_PROMPT = "empty prompt"
R_EMPTY_ANSWER = "empty answer"
R_BAD_RECORD = "malformed record"
REASONS = (R_NO_IMAGE, R_IMAGE_FILE, R_BAD_IMAGE, R_EMPTY_PROMPT, R_EMPTY_ANSWER, R_BAD_RECORD)

IMAGE_COLUMNS = ("image", "image_path")
PROMPT_COLUMNS = ("prompt", "question")
ANSWER_COLUMNS = ("answer", "caption")
CONVERSATION_COLUMN = "conversations"

SCHEMA_HELP = (
    "give every row an image ('image': bytes or a path relative to the image folder, or 'image_path') "
    "and text ('prompt'/'question' + 'answer'/'caption', or 'caption' alone, or LLaVA-style 'conversations')"
)
SPEC_HELP = (
    "pass --calib builtin[:caption|qa|mixed], a .parquet file, a .jsonl file (images relative to it), "
    "or a folder written by datasets' save_to_disk"
)


@dataclass(frozen=True)
class CalibRow:
    """One calibration row; ``reason`` is set (and image may be None) when it cannot be used."""

    id: int  # position of the row in its source: stable across formats and runs
    image: Image.Image | None
    prompt: str
    answer: str
    reason: str | None = None


@dataclass(frozen=True)
class Columns:
    """Which source columns play which role; per row, the first non-empty one of a role wins."""

    image: tuple[str, ...]
    prompt: tuple[str, ...]  # empty: prompt is CAPTION_PROMPT (caption-only) or from conversations
    answer: tuple[str, ...]  # empty: conversations
    conversations: str | None = None

    def needed(self) -> list[str]:
        return [*self.image, *self.prompt, *self.answer, *([self.conversations] if self.conversations else [])]


@dataclass(frozen=True)
class SourceInfo:
    """What a cheap validation found; goes into the job report."""

    kind: str  # "parquet" | "jsonl" | "datasets" | "builtin"
    location: str
    num_rows: int
    columns: Columns | None  # None for builtin
    mode: str | None = None  # builtin only
    extra: dict[str, Any] = field(default_factory=dict)


class CalibSource:
    """Base: a seeded permutation over ``num_rows`` records fetched by index, turned into rows."""

    def __init__(self, info: SourceInfo, num_samples: int, seed: int, image_root: Path | None):
        self.info = info
        self.num_samples = num_samples
        self.seed = seed
        self.image_root = image_root

    def __len__(self) -> int:
        return self.info.num_rows

    def __iter__(self) -> Iterator[CalibRow]:
        return self.rows()

    def order(self) -> np.ndarray:
        """The row ids in the order rows are offered to the collator."""
        return np.random.default_rng(self.seed).permutation(self.info.num_rows)

    def rows(self) -> Iterator[CalibRow]:
        """Every row, in seeded order, decoding images lazily ``FETCH_CHUNK`` rows at a time."""
        order = self.order()
        for start in range(0, len(order), FETCH_CHUNK):
            ids = [int(i) for i in order[start : start + FETCH_CHUNK]]
            for rid, rec in zip(ids, self._fetch(ids)):
                yield self._to_row(rid, rec)

    def _fetch(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """Raw records (dicts keyed by column) for row ids; None for a record that cannot be parsed."""
        raise NotImplementedError

    def _to_row(self, rid: int, rec: dict[str, Any] | None) -> CalibRow:
        cols = self.info.columns
        if rec is None or cols is None:
            return CalibRow(rid, None, "", "", R_BAD_RECORD)
        if cols.conversations:
            prompt, answer = _from_conversations(rec.get(cols.conversations))
        else:
            prompt = _first(rec, cols.prompt) if cols.prompt else CAPTION_PROMPT
            answer = _first(rec, cols.answer)
        return make_row(rid, _first(rec, cols.image), prompt, answer, self.image_root)


def _first(rec: dict[str, Any], names: Sequence[str]) -> Any:
    """The first value among ``names`` that is not None or blank (JSONL records may differ in keys)."""
    for n in names:
        v = rec.get(n)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    return None


def clean_text(value: Any) -> str:
    """Text as the template should see it: no literal image placeholders, no outer whitespace."""
    if value is None:
        return ""
    return str(value).replace("<image>", "").strip()


def decode_image(value: Any, image_root: Path | None) -> tuple[Image.Image | None, str | None]:
    """Any accepted image value -> (RGB image, None) or (None, reason)."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        return None, R_NO_IMAGE
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if not path.is_absolute() and image_root is not None:
                path = image_root / path
            if not path.is_file():
                return None, R_IMAGE_FILE
            with Image.open(path) as f:
                f.load()
                return f.convert("RGB"), None
        else:
            return None, R_BAD_IMAGE
        img.load()
        return img.convert("RGB"), None
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBomb...)
        return None, R_BAD_IMAGE


def make_row(rid: int, image_value: Any, prompt: Any, answer: Any, image_root: Path | None) -> CalibRow:
    """Normalize one record; text problems are reported before image problems are looked for."""
    p, a = clean_text(prompt), clean_text(answer)
    if not p:
        return CalibRow(rid, None, p, a, R_EMPTY_PROMPT)
    if not a:
        return CalibRow(rid, None, p, a, R_EMPTY_ANSWER)
    img, reason = decode_image(image_value, image_root)
    return CalibRow(rid, img, p, a, reason)


def _from_conversations(conv: Any) -> tuple[str | None, str | None]:
    """First human turn and the first assistant turn after it, from LLaVA/ShareGPT-style turns."""
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except ValueError:
            return None, None
    if not isinstance(conv, (list, tuple)):
        return None, None
    prompt = answer = None
    for turn in conv:
        if not isinstance(turn, dict):
            continue
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        if prompt is None and role in ("human", "user"):
            prompt = text
        elif prompt is not None and role in ("gpt", "assistant"):
            answer = text
            break
    return prompt, answer


def resolve_columns(names: Sequence[str], location: str) -> Columns:
    """Map a source's column names to roles, or say exactly what is missing."""
    names = list(names)
    found = ", ".join(names) if names else "none"
    image = tuple(c for c in IMAGE_COLUMNS if c in names)
    if not image:
        raise VlmqError(f"calibration source {location} has no image column (columns: {found})", SCHEMA_HELP)
    prompt = tuple(c for c in PROMPT_COLUMNS if c in names)
    answer = tuple(c for c in ANSWER_COLUMNS if c in names)
    if answer:
        return Columns(image, prompt, answer)
    if CONVERSATION_COLUMN in names:
        return Columns(image, (), (), CONVERSATION_COLUMN)
    raise VlmqError(
        f"calibration source {location} has no answer/caption column (columns: {found})", SCHEMA_HELP
    )


# ---------------------------------------------------------------- Parquet


class ParquetSource(CalibSource):
    """Reads only the needed columns of the row groups that hold the requested rows."""

    def __init__(self, path: Path, num_samples: int, seed: int, image_root: Path | None):
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:
            raise VlmqError(f"cannot read calibration parquet {path}: {e}", "check that it is a valid Parquet file") from e
        cols = resolve_columns(self._file.schema_arrow.names, str(path))
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._cache: OrderedDict[int, Any] = OrderedDict()  # row group -> pyarrow.Table
        info = SourceInfo("parquet", str(path), int(meta.num_rows), cols)
        super().__init__(info, num_samples, seed, image_root or path.parent)

    def _group(self, g: int) -> Any:
        if g not in self._cache:
            assert self.info.columns is not None
            self._cache[g] = self._file.read_row_group(g, columns=self.info.columns.needed())
            while len(self._cache) > 1:  # one row group of images is enough to hold
                self._cache.popitem(last=False)
        return self._cache[g]

    def _fetch(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        out: dict[int, dict[str, Any]] = {}
        for rid in sorted(ids):  # sorted: each row group is read once per chunk
            g = int(np.searchsorted(self._starts, rid, side="right") - 1)
            out[rid] = self._group(g).slice(rid - int(self._starts[g]), 1).to_pylist()[0]
        return [out[i] for i in ids]


# ---------------------------------------------------------------- JSONL


class JsonlSource(CalibSource):
    """Text records are small: all lines are parsed up front; images are read lazily by path."""

    def __init__(self, path: Path, num_samples: int, seed: int, image_root: Path | None):
        self._records: list[dict[str, Any] | None] = []
        keys: set[str] = set()
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        rec = None
                    if not isinstance(rec, dict):
                        rec = None
                    else:
                        keys.update(rec)
                    self._records.append(rec)
        except (OSError, UnicodeDecodeError) as e:
            raise VlmqError(f"cannot read calibration file {path}: {e}", "check that it is UTF-8 JSON Lines") from e
        if not self._records:
            raise VlmqError(f"calibration file {path} has no rows", SCHEMA_HELP)
        if not keys:
            raise VlmqError(f"calibration file {path} has no JSON object on any line", SCHEMA_HELP)
        cols = resolve_columns(sorted(keys), str(path))
        root = image_root or path.parent
        if not root.is_dir():
            raise VlmqError(f"image folder {root} for {path} does not exist", "pass the folder the image paths are relative to")
        info = SourceInfo("jsonl", str(path), len(self._records), cols, extra={"image_root": str(root)})
        super().__init__(info, num_samples, seed, root)

    def _fetch(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        return [self._records[i] for i in ids]


# ---------------------------------------------------------------- datasets (save_to_disk)


def _is_datasets_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


class DatasetsSource(CalibSource):
    """A ``save_to_disk`` folder; image features are read undecoded so bad bytes become a reason."""

    def __init__(self, path: Path, num_samples: int, seed: int, image_root: Path | None, split: str | None):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise VlmqError(f"cannot load datasets folder {path}: {e}", "write it with Dataset.save_to_disk") from e
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            if split is None:
                split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
            if split not in splits:
                hint = nearest(split or "", splits)
                raise VlmqError(
                    f"datasets folder {path} has splits {splits}; {'split ' + repr(split) + ' is not one' if split else 'which one?'}",
                    f"pass split={hint or splits[0]!r}",
                )
            ds = ds[split]
        cols = resolve_columns(list(ds.column_names), str(path))
        for c in cols.image:
            feat = ds.features.get(c)
            if isinstance(feat, datasets.Image) and feat.decode:
                ds = ds.cast_column(c, datasets.Image(decode=False))
        self._ds = ds.select_columns(cols.needed())
        info = SourceInfo("datasets", str(path), len(ds), cols, extra={"split": split})
        super().__init__(info, num_samples, seed, image_root or path)

    def _fetch(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        sub = self._ds.select(list(ids))
        return [sub[i] for i in range(len(sub))]


# ---------------------------------------------------------------- builtin


class BuiltinSource(CalibSource):
    """The synthetic scenes; generated on first iteration (``generate`` is deterministic)."""

    def __init__(self, mode: str, num_samples: int, seed: int):
        info = SourceInfo("builtin", f"builtin:{mode}", num_samples, None, mode=mode)
        super().__init__(info, num_samples, seed, None)
        self._samples: list[Any] | None = None

    def order(self) -> np.ndarray:
        return np.arange(self.info.num_rows)  # generate() already draws from the seed

    def _fetch(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        if self._samples is None:
            from .synthetic import generate

            self._samples = list(generate("calib", self.info.num_rows, self.seed))
        return [{"s": self._samples[i]} for i in ids]

    def _to_row(self, rid: int, rec: dict[str, Any] | None) -> CalibRow:
        assert rec is not None
        s = rec["s"]
        caption = self.info.mode == "caption" or (self.info.mode == "mixed" and rid % 2 == 0)
        if caption:
            return make_row(rid, s.image, CAPTION_PROMPT, s.caption, None)
        return make_row(rid, s.image, s.question, s.answer, None)


# ---------------------------------------------------------------- entry point


def _local_path(spec: str) -> Path:
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    elif "://" in spec:
        raise VlmqError(f"calibration source {spec!r}: only local paths are supported", SPEC_HELP)
    return Path(spec).expanduser()


def open_calib_source(
    spec: str | Any,
    *,
    num_samples: int | None = None,
    seed: int | None = None,
    mode: str | None = None,
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
) -> CalibSource:
    """Parse ``--calib`` and open the source, checking everything that needs no model.

    ``spec`` is the ``--calib`` string, or a ``CalibSpec``-like object (fields ``source``,
    ``num_samples``, ``seed``, ``mode``, ``image_dir``, optional ``split``); keyword arguments
    override its fields. Defaults: 128 samples, seed 42. Cheap: reads schemas, metadata and (for
    JSONL) the text lines, never images. ``mode`` applies to ``builtin`` only (``builtin:MODE``
    in the spec works too).
    """
    if not isinstance(spec, str) and hasattr(spec, "source"):
        num_samples = num_samples if num_samples is not None else getattr(spec, "num_samples", None)
        seed = seed if seed is not None else getattr(spec, "seed", None)
        mode = mode if mode is not None else getattr(spec, "mode", None)
        image_root = image_root if image_root is not None else getattr(spec, "image_dir", None)
        split = split if split is not None else getattr(spec, "split", None)
        spec = spec.source
    num_samples = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
    seed = DEFAULT_SEED if seed is None else seed
    if not isinstance(spec, str) or not spec.strip():
        raise VlmqError("no calibration source given", SPEC_HELP)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise VlmqError(f"num_samples must be a positive integer, got {num_samples!r}", "use e.g. 128 (the MBQ paper's setting)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise VlmqError(f"seed must be an integer, got {seed!r}", "use e.g. 42 (the MBQ paper's setting)")
    spec = spec.strip()
    root = Path(image_root).expanduser() if image_root is not None else None
    if spec == "builtin" or spec.startswith("builtin:"):
        spec_mode = spec.partition(":")[2] or None
        m = spec_mode or mode or "caption"  # the spec string wins over a mode field
        if m not in MODES:
            hint = nearest(m, MODES)
            raise VlmqError(f"unknown builtin calibration mode {m!r}", f"use one of {', '.join(MODES)}" + (f" (did you mean {hint!r}?)" if hint else ""))
        return BuiltinSource(m, num_samples, seed)
    path = _local_path(spec)
    if not path.exists():
        raise VlmqError(f"calibration source {path} does not exist", SPEC_HELP)
    if path.is_dir():
        if _is_datasets_dir(path):
            src: CalibSource = DatasetsSource(path, num_samples, seed, root, split)
        else:
            raise VlmqError(f"calibration folder {path} is not a datasets folder (no dataset_info.json / dataset_dict.json)", SPEC_HELP)
    elif path.suffix.lower() == ".parquet":
        src = ParquetSource(path, num_samples, seed, root)
    elif path.suffix.lower() == ".jsonl":
        src = JsonlSource(path, num_samples, seed, root)
    else:
        raise VlmqError(f"calibration source {path}: unknown format {path.suffix or '(no suffix)'!r}", SPEC_HELP)
    if len(src) == 0:
        raise VlmqError(f"calibration source {path} has no rows", SCHEMA_HELP)
    return src


def check_calib_source(spec: str | Any, **kwargs: Any) -> SourceInfo:
    """The model-free check the job runs first: raises VlmqError, or says what was found."""
    return open_calib_source(spec, **kwargs).info
