"""Calibration rows -> one Arrow table, through the model's own processor and chat template.

Each usable row becomes one table row (schema :data:`TABLE_SCHEMA`):

- ``input_ids`` / ``attention_mask``: what the processor returns for the rendered conversation
  (user turn = image + prompt, assistant turn = answer), i.e. *after* image-token expansion;
- ``labels``: the answer's tokens, -100 everywhere else (template markers such as ``</s>`` or
  ``<|im_end|>`` after the answer are not labels);
- ``vision_mask``: ``input_ids == vision_token_id``;
- ``model_inputs``: every other tensor the processor returned (``pixel_values``,
  ``image_grid_thw``, ``image_sizes``, ...) as safetensors bytes;
- ``text``: the rendered conversation (before expansion).

How the answer span is found, robustly: the rendered text is tokenized once more, without image
expansion, with character offsets; the tokens overlapping the answer's characters (searched after
the generation prompt) are the answer. Image expansion only rewrites placeholders in the user turn,
so everything from the answer on is the same token sequence in both tokenizations; that equality is
checked for every row, and the span is placed counting from the end.

``max_length`` skips longer rows (reason ``longer than max_length``) rather than truncating them:
a cut would drop the answer (it comes last) or split an image's tokens from its pixel tensors.
M-RoPE positions are not stored here: the capture pass records each sample's decoder-layer
kwargs (``position_embeddings``, ...) in the activation store's meta (:mod:`.store`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import VlmqError
from .sources import SCHEMA_HELP, CalibRow

IGNORE_INDEX = -100
PROGRESS_MIN_ROWS = 32
R_TOO_LONG = "longer than max_length"
R_NO_ANSWER = "answer not found in the chat template output"
R_SPAN = "answer tokens changed by image expansion"
R_PROCESSOR = "processor rejected the row"

TABLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())),
        ("vision_mask", pa.list_(pa.bool_())),
        ("model_inputs", pa.binary()),
        ("text", pa.string()),
    ]
)


@dataclass
class DataReport:
    """What happened to the calibration rows; goes into the job report."""

    requested: int
    seen: int = 0
    usable: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "id: detail"
    tokens: int = 0
    vision_tokens: int = 0
    answer_tokens: int = 0

    def skip(self, row_id: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(f"row {row_id}" + (f": {detail}" if detail else ""))

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "seen": self.seen,
            "usable": self.usable,
            "skipped_total": sum(self.skipped.values()),
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "tokens": self.tokens,
            "vision_tokens": self.vision_tokens,
            "answer_tokens": self.answer_tokens,
        }

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.usable}/{self.requested} calibration rows used ({self.seen} seen; skipped: {skipped}); "
            f"{self.tokens} tokens, {self.vision_tokens} vision, {self.answer_tokens} answer"
        )


def conversation(row: CalibRow, with_answer: bool = True) -> list[dict[str, Any]]:
    """The chat messages for one row, in the processor chat-template format."""
    user: list[dict[str, Any]] = ([{"type": "image"}] if row.image is not None else []) + [
        {"type": "text", "text": row.prompt}
    ]
    msgs: list[dict[str, Any]] = [{"role": "user", "content": user}]
    if with_answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": row.answer}]})
    return msgs


def _answer_char_span(full: str, prompt: str, answer: str) -> tuple[int, int] | None:
    start_at = len(prompt) if full.startswith(prompt) else 0
    pos = full.find(answer, start_at)
    if pos < 0:
        return None
    if not full.startswith(prompt):  # unusual template: take the last occurrence
        pos = full.rfind(answer)
    return pos, pos + len(answer)


@dataclass
class _Encoded:
    input_ids: torch.Tensor  # [T] int64
    attention_mask: torch.Tensor  # [T]
    labels: torch.Tensor  # [T] int64
    extra: dict[str, torch.Tensor]
    text: str


def encode_row(row: CalibRow, processor: Any) -> _Encoded | tuple[str, str]:
    """One row through the processor: the encoding, or (reason, detail) when it cannot be used."""
    tok = processor.tokenizer
    full = processor.apply_chat_template(conversation(row), tokenize=False)
    prompt = processor.apply_chat_template(conversation(row, False), tokenize=False, add_generation_prompt=True)
    span = _answer_char_span(full, prompt, row.answer)
    if span is None:
        return R_NO_ANSWER, repr(row.answer[:40])
    bos = getattr(tok, "bos_token", None)
    add_special = not (bos and full.startswith(bos))  # as ProcessorMixin.apply_chat_template does
    try:
        out = processor(
            text=[full],
            images=[[row.image]] if row.image is not None else None,
            return_tensors="pt",
            add_special_tokens=add_special,
        )
    except Exception as e:  # a per-image failure (e.g. an image too small for the patch grid)
        return R_PROCESSOR, f"{type(e).__name__}: {str(e)[:120]}"
    ids = torch.as_tensor(out["input_ids"])[0].long()
    # Answer span on the unexpanded tokenization, then moved to the expanded one from the end.
    enc = tok(full, return_offsets_mapping=True, add_special_tokens=add_special)
    plain, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    hit = [i for i, (s, e) in enumerate(offsets) if e > span[0] and s < span[1] and e > s]
    if not hit:
        return R_NO_ANSWER, repr(row.answer[:40])
    a, b = hit[0], hit[-1] + 1
    tail = len(plain) - a
    if tail > len(ids) or ids[len(ids) - tail :].tolist() != plain[a:]:
        return R_SPAN, "expanded and plain tokenizations differ after the prompt"
    start = len(ids) - tail
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[start : start + (b - a)] = ids[start : start + (b - a)]
    mask = torch.as_tensor(out["attention_mask"])[0] if "attention_mask" in out else torch.ones_like(ids)
    extra: dict[str, torch.Tensor] = {}
    for k, v in out.items():
        if k in ("input_ids", "attention_mask"):
            continue
        try:
            extra[k] = torch.as_tensor(v).contiguous().clone()
        except (TypeError, ValueError, RuntimeError):
            continue  # non-tensor metadata the model does not take
    return _Encoded(ids, mask, labels, extra, full)


def _progress(total: int):
    """A rich progress bar on stderr for long runs, else None."""
    if total <= PROGRESS_MIN_ROWS:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("calibration data"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=False,
    )


def build_calibration_table(
    rows: Iterable[CalibRow],
    processor: Any,
    vision_token_id: int,
    *,
    max_rows: int,
    max_length: int | None = None,
) -> tuple[pa.Table, DataReport]:
    """Encode up to ``max_rows`` usable rows (skipping and counting the rest) into one table.

    Rows are consumed lazily, so a skipped row is replaced by the next one the source offers.
    Zero usable rows raises :class:`VlmqError` (nothing model-related has run yet).
    """
    if max_rows < 1:
        raise VlmqError(f"max_rows must be >= 1, got {max_rows}", "ask for at least one calibration sample")
    report = DataReport(requested=max_rows)
    cols: dict[str, list[Any]] = {f.name: [] for f in TABLE_SCHEMA}
    progress = _progress(max_rows)
    task = progress.add_task("rows", total=max_rows) if progress else None
    if progress:
        progress.start()
    try:
        for row in rows:
            if report.usable >= max_rows:
                break
            report.seen += 1
            if row.reason is not None:
                report.skip(row.id, row.reason)
                continue
            enc = encode_row(row, processor)
            if isinstance(enc, tuple):
                report.skip(row.id, *enc)
                continue
            n = int(enc.input_ids.numel())
            if max_length is not None and n > max_length:
                report.skip(row.id, R_TOO_LONG, f"{n} tokens")
                continue
            vis = enc.input_ids == vision_token_id
            if row.image is not None and not bool(vis.any()):
                raise VlmqError(
                    f"the processor produced no token with vision_token_id={vision_token_id} for an image row",
                    "pass the model config's image token id, and use the processor files that came with the model",
                )
            cols["sample_id"].append(int(row.id))
            cols["input_ids"].append(enc.input_ids.to(torch.int32).numpy())
            cols["attention_mask"].append(enc.attention_mask.to(torch.int8).numpy())
            cols["labels"].append(enc.labels.to(torch.int32).numpy())
            cols["vision_mask"].append(vis.numpy())
            cols["model_inputs"].append(st_save(enc.extra) if enc.extra else b"")
            cols["text"].append(enc.text)
            report.usable += 1
            report.tokens += n
            report.vision_tokens += int(vis.sum())
            report.answer_tokens += int((enc.labels != IGNORE_INDEX).sum())
            if progress:
                progress.update(task, completed=report.usable)
    finally:
        if progress:
            progress.stop()
    if report.usable == 0:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped.items())) or "the source offered none"
        examples = "; ".join(f"{r}: {', '.join(ex)}" for r, ex in report.examples.items())
        raise VlmqError(
            f"the calibration data has no usable rows ({report.seen} seen; skipped: {skipped})"
            + (f" [{examples}]" if examples else ""),
            f"fix or replace the source; {SCHEMA_HELP}",
        )
    arrays = [
        pa.array(cols["sample_id"], pa.int64()),
        *(pa.array(cols[k], TABLE_SCHEMA.field(k).type) for k in ("input_ids", "attention_mask", "labels", "vision_mask")),
        pa.array(cols["model_inputs"], pa.binary()),
        pa.array(cols["text"], pa.string()),
    ]
    meta = {"vlmq.vision_token_id": str(int(vision_token_id)), "vlmq.processor": type(processor).__name__}
    return pa.Table.from_arrays(arrays, schema=TABLE_SCHEMA.with_metadata(meta)), report


# ---------------------------------------------------------------- reading rows back


def _list(table: pa.Table, col: str, i: int) -> np.ndarray:
    return table.column(col)[i].values.to_numpy(zero_copy_only=False)


def row_to_model_inputs(table: pa.Table, i: int) -> dict[str, torch.Tensor]:
    """Batch-1 tensors of row ``i``, ready for ``model(**inputs)``."""
    ids = torch.from_numpy(_list(table, "input_ids", i).astype(np.int64)).unsqueeze(0)
    mask = torch.from_numpy(_list(table, "attention_mask", i).astype(np.int64)).unsqueeze(0)
    blob = table.column("model_inputs")[i].as_py()
    extra = st_load(blob) if blob else {}
    return {"input_ids": ids, "attention_mask": mask, **extra}


def row_labels(table: pa.Table, i: int) -> torch.Tensor:
    """``[1, T]`` int64 labels of row ``i`` (-100 outside the answer)."""
    return torch.from_numpy(_list(table, "labels", i).astype(np.int64)).unsqueeze(0)


def row_masks(table: pa.Table, i: int) -> dict[str, torch.Tensor]:
    """``[T]`` bool masks of row ``i``: ``vision_mask`` and ``answer_mask`` (labels != -100)."""
    vis = torch.from_numpy(_list(table, "vision_mask", i).astype(np.bool_))
    ans = torch.from_numpy(_list(table, "labels", i) != IGNORE_INDEX)
    return {"vision_mask": vis, "answer_mask": ans}


# ---------------------------------------------------------------- files and splits


def save_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write an Arrow IPC file atomically (temp file, fsync, rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_table(path: str | os.PathLike) -> pa.Table:
    """Read a table written by :func:`save_table` (memory-mapped)."""
    with pa.memory_map(os.fspath(path), "r") as src:
        return pa.ipc.open_file(src).read_all()


def split_holdout(table: pa.Table, n_holdout: int, seed: int = 42) -> tuple[pa.Table, pa.Table]:
    """(calibration rows, ``n_holdout`` held-out rows for fidelity), chosen by seed, order kept."""
    n = table.num_rows
    if n_holdout < 0 or n_holdout >= n:
        raise VlmqError(
            f"cannot hold out {n_holdout} of {n} calibration rows",
            f"hold out between 0 and {n - 1} rows, or ask for more calibration samples",
        )
    perm = np.random.default_rng(seed).permutation(n)
    hold = np.sort(perm[:n_holdout])
    keep = np.sort(perm[n_holdout:])
    return table.take(pa.array(keep, pa.int64())), table.take(pa.array(hold, pa.int64()))
