"""How far a quantized model's next-token distribution is from the fp model's (pure torch)."""

from __future__ import annotations

import torch


def logit_fidelity(fp_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """KL(fp || quant) per token (nats), top-1 agreement and token count over ``mask`` positions.

    Logits are ``[T, V]``; computed in float64 so a checkpoint against itself gives exactly 0.
    """
    p = torch.log_softmax(fp_logits.double(), dim=-1)
    q = torch.log_softmax(q_logits.double(), dim=-1)
    if mask is not None:
        p, q = p[mask], q[mask]
    if p.shape[0] == 0:
        return {"kl": float("nan"), "top1": float("nan"), "tokens": 0}
    kl = (p.exp() * (p - q)).sum(-1)
    top1 = (p.argmax(-1) == q.argmax(-1)).double()
    return {"kl": float(kl.mean()), "top1": float(top1.mean()), "tokens": int(p.shape[0])}


def merge_fidelity(parts: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted mean of per-sample fidelity dicts."""
    n = sum(p["tokens"] for p in parts)
    if n == 0:
        return {"kl": float("nan"), "top1": float("nan"), "tokens": 0}
    return {
        "kl": sum(p["kl"] * p["tokens"] for p in parts if p["tokens"]) / n,
        "top1": sum(p["top1"] * p["tokens"] for p in parts if p["tokens"]) / n,
        "tokens": n,
    }


def prediction_masks(answer_mask: torch.Tensor, vision_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks over logit positions ``t`` (which predict token ``t + 1``).

    ``answer``: the next token is an answer token; ``text``: the next token is any other
    non-vision token (prompt, template) — plain text, not conditioned on being an answer.
    """
    T = answer_mask.shape[0]
    nxt_answer = torch.zeros(T, dtype=torch.bool)
    nxt_text = torch.zeros(T, dtype=torch.bool)
    nxt_answer[:-1] = answer_mask[1:]
    nxt_text[:-1] = ~vision_mask[1:] & ~nxt_answer[:-1]
    return {"answer": nxt_answer, "text": nxt_text}


@torch.no_grad()
def reference_outputs(model: torch.nn.Module, table, load_results, n_reference: int = 4,
                      act_bits: int = 16) -> dict:
    """fp logits, then fake-quant logits (``load_results() -> (quantized, replaced)`` applied to
    the same model in place), on every row of a held-out calibration table.

    Returns fidelity per mask and, for the first ``n_reference`` samples, the inputs and the
    fake-quant logits: the reference a written checkpoint must reproduce.
    """
    from ..data.collate import row_masks, row_to_model_inputs
    from ..quant.apply import apply_fake_quant

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs, masks, fp_logits = [], [], []
    for r in range(table.num_rows):
        inp = row_to_model_inputs(table, r)
        rm = row_masks(table, r)
        inputs.append(inp)
        masks.append(prediction_masks(rm["answer_mask"], rm["vision_mask"]))
        fp_logits.append(_logits(model, inp, device, dtype))
    quantized, replaced = load_results()
    apply_fake_quant(model, quantized, replaced, act_bits=act_bits)
    per_mask: dict[str, list] = {"answer": [], "text": []}
    ref_logits, ref_fp = [], []
    for i, (inp, m, fp) in enumerate(zip(inputs, masks, fp_logits)):
        q = _logits(model, inp, device, dtype)
        for k in per_mask:
            per_mask[k].append(logit_fidelity(fp, q, m[k]))
        if i < n_reference:
            ref_logits.append(q.unsqueeze(0))
            ref_fp.append(fp.unsqueeze(0))
    return {
        "fidelity": {k: merge_fidelity(v) for k, v in per_mask.items()},
        "inputs": inputs[:n_reference],
        "ref_logits": ref_logits,
        "ref_fp_logits": ref_fp,
    }


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device, dtype) -> torch.Tensor:
    moved = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return model(**moved, use_cache=False).logits[0].float().cpu()
