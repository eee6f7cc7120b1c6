"""Tasks on calibration-format data (``--calib`` sources): caption perplexity and fidelity vs fp.

Rows go through the checkpoint's own processor and chat template exactly as in a quantize job
(``data.collate.build_calibration_table``), so ``labels`` mark the answer/caption tokens and
``vision_mask`` the expanded image tokens. The built-in source uses a seed other than the
calibration default (42), so its rows are held out from what a default job calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import scoring
from .base import RunContext, Task, seeded
from .generate import next_token_nll, row_logits

HELDOUT_SEED = 7  # built-in rows for evaluation: not the calibration seed (42)


def _table(ctx: RunContext, source: str, n: int, seed: int, mode: str | None) -> Any:
    """The first ``n`` usable rows of ``source``, encoded for this checkpoint (cached per worker)."""
    key = f"table:{source}:{n}:{seed}:{mode}:{ctx.ckpt.path}"
    if key not in ctx.cache:
        from ...data.collate import build_calibration_table
        from ...data.sources import open_calib_source
        from ...models import detect_adapter

        src = open_calib_source(source, num_samples=n, seed=seed, mode=mode)
        adapter = detect_adapter(ctx.model.config.to_dict())
        vision_id = adapter.image_token_id(ctx.model.config)
        table, _report = build_calibration_table(src.rows(), ctx.processor, vision_id, max_rows=n)
        ctx.cache[key] = table
    return ctx.cache[key]


def source_seed(source: str) -> int:
    return HELDOUT_SEED if source.startswith("builtin") else 42


@dataclass(frozen=True)
class CaptionPerplexity(Task):
    """``caption-ppl:SOURCE``: perplexity of the reference caption (or answer) tokens given image + prompt."""

    def run(self, ctx: RunContext, start: int, stop: int) -> list[dict[str, Any]]:
        from ...data.collate import row_masks, row_to_model_inputs

        seeded(self.seed)
        table = _table(ctx, self.source, self.num_examples, source_seed(self.source), None)
        out = []
        for r in range(start, min(stop, table.num_rows)):
            inputs = row_to_model_inputs(table, r)
            logits = row_logits(ctx.model, inputs, ctx.device, ctx.dtype)
            nll = next_token_nll(logits, inputs["input_ids"])
            target = _next(row_masks(table, r)["answer_mask"])
            out.append({"id": int(table.column("sample_id")[r].as_py()), "nll": float(nll[target].sum()),
                        "tokens": int(target.sum())})
        return out

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return scoring.perplexity_metrics(records)

    def headline(self, metrics: dict[str, Any]) -> tuple[str, float | None]:
        return "perplexity", metrics.get("perplexity")


def _next(mask: torch.Tensor) -> torch.Tensor:
    """Positions t whose *next* token is in ``mask`` (logits at t predict token t+1)."""
    out = torch.zeros_like(mask)
    out[:-1] = mask[1:]
    return out


@dataclass(frozen=True)
class Fidelity(Task):
    """``fidelity[:SOURCE]``: KL(fp||quant) per token, top-1 agreement and perplexity of both models,
    separately over positions predicting answer tokens (vision-conditioned) and plain text tokens
    (prompt/template; ``evaluate.fidelity.prediction_masks``)."""

    @property
    def needs_reference(self) -> bool:
        return True

    def run(self, ctx: RunContext, start: int, stop: int) -> list[dict[str, Any]]:
        from ...data.collate import row_masks, row_to_model_inputs
        from ..fidelity import logit_fidelity, prediction_masks

        seeded(self.seed)
        if ctx.reference is None:
            raise RuntimeError("fidelity needs the fp model")
        table = _table(ctx, self.source, self.num_examples, source_seed(self.source), None)
        rows = list(range(start, min(stop, table.num_rows)))
        inputs = [row_to_model_inputs(table, r) for r in rows]
        q_logits = [row_logits(ctx.model, x, ctx.device, ctx.dtype) for x in inputs]
        fp_model, _ = ctx.reference()
        fp_logits = [row_logits(fp_model, x, ctx.device, ctx.dtype) for x in inputs]
        out = []
        for r, x, fp, q in zip(rows, inputs, fp_logits, q_logits):
            m = row_masks(table, r)
            masks = prediction_masks(m["answer_mask"], m["vision_mask"])
            nll_fp, nll_q = next_token_nll(fp, x["input_ids"]), next_token_nll(q, x["input_ids"])
            rec: dict[str, Any] = {"id": int(table.column("sample_id")[r].as_py())}
            for name, mask in masks.items():
                f = logit_fidelity(fp, q, mask)
                rec[name] = {"kl": f["kl"], "top1": f["top1"], "tokens": f["tokens"],
                             "nll_fp": float(nll_fp[mask].sum()), "nll_q": float(nll_q[mask].sum())}
            out.append(rec)
        return out

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return scoring.fidelity_metrics(records)

    def headline(self, metrics: dict[str, Any]) -> tuple[str, float | None]:
        return "kl (answer)", (metrics.get("answer") or {}).get("kl")
