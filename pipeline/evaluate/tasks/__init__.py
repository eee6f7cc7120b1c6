"""Evaluation tasks of ``vlmq eval --tasks``, from local data only.

=====================  ==========================================================================
task                   what it measures
=====================  ==========================================================================
``builtin-vqa``        the built-in synthetic VQA test split (``synthetic.generate("test", n,
                       seed)``), greedy answers, normalized exact match; ``accuracy`` and
                       ``per_skill``. Default 1000 examples, seed ``--seed`` (0).
``vqa:FILE``           open-ended VQA: ``.jsonl`` or ``.parquet`` rows with ``question``,
                       ``answers`` (list of reference strings, e.g. VQAv2's ten) or ``answer``,
                       an image (``image``: bytes / path / ``{"bytes", "path"}``, or
                       ``image_path``; paths relative to the file), optional ``question_id``
                       and ``category``. The prompt is the question plus "Answer the question
                       using a single word or phrase.", or a row's ``prompt`` verbatim
                       (``tasks/export.py`` writes the built-in test split in this format).
                       Score: VQAv2-normalized exact match
                       against any reference (``accuracy``); with 3+ references also VQAv2's
                       consensus ``min(matches / 3, 1)`` (``vqa_consensus``).
``mc:FILE``            ScienceQA-style multiple choice: rows with ``question``, ``choices``
                       (list of 2..26 strings), ``answer`` (0-based index or letter), optional
                       image (as above; none: text-only), ``hint`` (context), ``subject``.
                       The output's letter is parsed deterministically
                       (``scoring.parse_choice``); unparseable counts as wrong.
``caption-ppl:SRC``    perplexity of the caption/answer tokens given image + prompt; SRC is any
                       ``--calib`` source (``builtin`` = built-in captions, ``.parquet``,
                       ``.jsonl``, datasets folder). Default 64 rows.
``fidelity[:SRC]``     vs the fp model on held-out calibration-format rows (default
                       ``builtin:qa``, seed 7): KL(fp||quant) per token, top-1 agreement and
                       both perplexities, separately for answer tokens and plain text tokens.
                       The fp model: ``--fp-model``, else the ``model`` in the checkpoint's
                       ``report.json``. Default 128 rows.
``speed``              weight bytes; on a GPU peak memory and batch-1 decode tokens/s.
=====================  ==========================================================================

Rows that cannot be used (unreadable image, missing question, bad answer) are counted as
``skipped``, never scored.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import VlmqError, nearest
from .base import RunContext, Task
from .calib import CaptionPerplexity, Fidelity
from .data import check_file
from .qa import BuiltinVQA, MultipleChoice, OpenVQA
from .speed import Speed

KINDS = ("builtin-vqa", "vqa", "mc", "caption-ppl", "fidelity", "speed")
DEFAULT_LIMIT = {"builtin-vqa": 1000, "caption-ppl": 64, "fidelity": 128}
DEFAULT_SHARD = {"builtin-vqa": 250, "vqa": 50, "mc": 50, "caption-ppl": 32, "fidelity": 32, "speed": 1}
ALIASES = {"scienceqa": "mc", "caption_ppl": "caption-ppl", "builtin_vqa": "builtin-vqa"}
FIDELITY_DEFAULT_SOURCE = "builtin:qa"  # the built-in model answers questions; it never learned captions


def _calib_rows(source: str, limit: int) -> int:
    from ...data.sources import open_calib_source

    src = open_calib_source(source, num_samples=limit)  # validates the source (cheap)
    return min(limit, len(src))


def parse_task(spec: str, limit: int | None = None, seed: int = 0, shard_size: int | None = None) -> Task:
    """A ``--tasks`` entry -> its Task, with files checked and examples counted (no model work)."""
    kind, _, source = spec.strip().partition(":")
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        hint = nearest(kind, KINDS)
        raise VlmqError(f"unknown task {spec!r}", f"use one of {', '.join(KINDS)}" + (f" (did you mean {hint!r}?)" if hint else ""))
    if limit is not None and limit < 1:
        raise VlmqError(f"--limit must be >= 1, got {limit}", "pass a positive number of examples per task")
    lim = limit if limit is not None else DEFAULT_LIMIT.get(kind)
    shard = shard_size or DEFAULT_SHARD[kind]
    if kind in ("builtin-vqa", "speed"):
        if source:
            raise VlmqError(f"task {kind} takes no source, got {spec!r}", f"write just '{kind}' (use --limit for the size)")
        n = lim if kind == "builtin-vqa" else 1
        cls = BuiltinVQA if kind == "builtin-vqa" else Speed
        return cls(kind, kind, None, lim, seed, shard, n)
    if kind in ("vqa", "mc"):
        if not source:
            raise VlmqError(f"task {kind} needs a file: {kind}:FILE.jsonl or {kind}:FILE.parquet",
                            "see `vlmq eval --help` for the row format")
        required = [("question", "prompt"), ("answers", "answer")] if kind == "vqa" else \
            [("question", "prompt"), ("choices", "options"), ("answer",)]
        rows = check_file(source, "VQA" if kind == "vqa" else "multiple-choice", required)
        path = str(Path(source).expanduser().resolve())
        n = min(rows, lim) if lim else rows
        cls = OpenVQA if kind == "vqa" else MultipleChoice
        return cls(kind, f"{kind}:{Path(source).name}", path, lim, seed, shard, n)
    src = source or (FIDELITY_DEFAULT_SOURCE if kind == "fidelity" else "")
    if not src:
        raise VlmqError(f"task {kind} needs a calibration-format source: {kind}:SOURCE",
                        "e.g. caption-ppl:builtin or caption-ppl:captions.parquet")
    if not src.startswith("builtin"):
        src = str(Path(src).expanduser().resolve())
    n = _calib_rows(src, lim)
    name = f"{kind}:{source}" if source else kind
    if not src.startswith("builtin"):
        name = f"{kind}:{Path(src).name}"
    cls = CaptionPerplexity if kind == "caption-ppl" else Fidelity
    return cls(kind, name, src, lim, seed, shard, n)


__all__ = ["KINDS", "RunContext", "Task", "parse_task"]
