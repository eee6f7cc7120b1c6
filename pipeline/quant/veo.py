"""Q-VLM visual-encoder optimization (VEO), as METHODS.md §5 defines it for vlmq.

With the quantized language model frozen, tune a small parameter set of the projector to minimize

    KL(p_fp || p_q) on answer tokens  +  eta * H_soft(vision-token inputs of decoder layer 0)

where p_fp / p_q are the next-token distributions of the fp and the fake-quant model, averaged over
the positions that predict an answer token (``labels[t + 1] != -100``), and H_soft is
``entropy.soft_entropy``: a triangular-kernel soft histogram over each token's symmetric range
(``x / absmax_t`` in [-1, 1]), the differentiable stand-in for the histogram entropy the partition
uses. The projector's parameters are passed as overrides (``torch.func.functional_call``) from
fp32 master copies, so neither model is modified; the caller applies the returned tensors and
re-partitions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .entropy import soft_entropy

_META_KEYS = ("labels", "vision_mask", "answer_mask", "fp_logprobs")


@dataclass
class VEOOptions:
    params: str = "affine"  # affine: 1-D tensors (norm scales/biases, Linear biases) | all: every projector tensor
    eta: float = 0.001  # weight of the entropy term (larger values made vision tokens spikier in bench_veo.py)
    lr: float = 1e-3
    steps: int = 50  # Adam steps
    batch_size: int = 1  # inputs per step
    bins: int = 64  # soft-histogram bins
    seed: int = 0

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> VEOOptions:
        names = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in (options or {}).items() if k in names and v is not None})
        if out.params not in ("affine", "all"):
            raise ValueError(f"veo params must be affine|all, got {out.params!r}")
        return out


def projector_parameters(model: nn.Module, projector_path: str, which: str = "affine") -> dict[str, torch.Tensor]:
    """Full name -> parameter of the tuned set: every projector parameter with ``dim <= 1``
    (norm scales/biases, Linear biases) for "affine", all of them for "all"."""
    proj = model.get_submodule(projector_path)
    out = {f"{projector_path}.{n}": p for n, p in proj.named_parameters() if which == "all" or p.dim() <= 1}
    if not out:
        raise ValueError(f"{projector_path} has no parameters in the {which!r} set")
    return out


def answer_kl(fp_logp: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p_fp || p_q)``; ``fp_logp`` are fp log-probs ``[N, V]``."""
    q_logp = torch.log_softmax(q_logits.float(), dim=-1)
    return (fp_logp.exp() * (fp_logp - q_logp)).sum(-1).mean()


def answer_positions(inp: Mapping[str, Any]) -> torch.Tensor:
    """``[T]`` bool: the positions whose logits predict an answer token (for ``fp_logprobs``)."""
    return _split(inp)[1]


def _split(inp: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Model inputs, the answer-prediction positions ``[T]`` and the vision mask ``[T]``."""
    model_in = {k: v for k, v in inp.items() if k not in _META_KEYS}
    T = model_in["input_ids"].shape[-1]
    if "labels" in inp:
        lab = inp["labels"].reshape(-1)
        pred = torch.zeros(T, dtype=torch.bool, device=lab.device)
        pred[:-1] = lab[1:] != -100  # logits at t predict token t + 1
    else:
        ans = inp["answer_mask"].reshape(-1).bool()
        pred = torch.zeros(T, dtype=torch.bool, device=ans.device)
        pred[:-1] = ans[1:]
    return model_in, pred, inp["vision_mask"].reshape(-1).bool()


class _Layer0Input:
    """Forward pre-hook keeping decoder layer 0's input (with its graph)."""

    def __init__(self, layer: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = args[0] if args else kwargs["hidden_states"]


def optimize_projector(
    fp_model: nn.Module | None,
    q_model: nn.Module,
    inputs: Sequence[Mapping[str, Any]],
    projector_path: str,
    layers_path: str,
    options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tune ``q_model``'s projector set (see ``VEOOptions``) on ``inputs``.

    Each input is a batch-1 dict of model inputs (``input_ids``, ``pixel_values``, ...) plus
    ``labels`` ``[1, T]`` (-100 outside the answer; or ``answer_mask``) and ``vision_mask`` ``[T]``,
    already on the models' device. ``fp_model=None``: each input carries ``fp_logprobs``
    ``[N, V]`` instead, the fp model's log-probs at the answer-predicting positions (so only the
    quantized model needs to be resident). Returns (full name -> new tensor in the parameter's
    dtype, log with per-step terms and the objective over all inputs before/after).
    """
    t0 = time.perf_counter()
    opts = VEOOptions.from_mapping(options)
    tuned = projector_parameters(q_model, projector_path, opts.params)
    master = {n: p.detach().float().clone().requires_grad_(True) for n, p in tuned.items()}
    layer0 = q_model.get_submodule(layers_path)[0]

    # fp targets once: log-probs at answer-predicting positions only
    prepared = []
    with torch.no_grad():
        for inp in inputs:
            model_in, pred, vis = _split(inp)
            if fp_model is None:
                fp_logp = inp["fp_logprobs"].float()
            else:
                fp_logp = torch.log_softmax(fp_model(**model_in, use_cache=False).logits[0][pred].float(), dim=-1)
            if fp_logp.shape[0] != int(pred.sum()):
                raise ValueError(f"fp_logprobs has {fp_logp.shape[0]} rows for {int(pred.sum())} answer positions")
            prepared.append((model_in, pred, vis, fp_logp))

    saved = {n: p.requires_grad for n, p in q_model.named_parameters()}
    for p in q_model.parameters():
        p.requires_grad_(False)
    hook = _Layer0Input(layer0)

    def objective(item, overrides) -> tuple[torch.Tensor, torch.Tensor]:
        model_in, pred, vis, fp_logp = item
        out = functional_call(q_model, overrides, args=(), kwargs={**model_in, "use_cache": False})
        kl = answer_kl(fp_logp, out.logits[0][pred]) if pred.any() else out.logits.sum() * 0
        h0 = hook.value.reshape(-1, hook.value.shape[-1])
        ent = soft_entropy(h0[vis], opts.bins) if vis.any() else kl * 0
        return kl, ent

    def overrides_of(vals: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: vals[n].to(tuned[n].dtype) for n in tuned}

    def evaluate(vals: Mapping[str, torch.Tensor]) -> dict[str, float]:
        kls, ents = [], []
        with torch.no_grad():
            for item in prepared:
                kl, ent = objective(item, overrides_of(vals))
                kls.append(float(kl))
                ents.append(float(ent))
        kl, ent = sum(kls) / len(kls), sum(ents) / len(ents)
        return {"kl": kl, "entropy": ent, "objective": kl + opts.eta * ent}

    try:
        before = evaluate(master)
        opt = torch.optim.Adam(list(master.values()), lr=opts.lr)
        gen = torch.Generator().manual_seed(opts.seed)
        order: list[int] = []
        steps = []
        for step in range(opts.steps):
            opt.zero_grad(set_to_none=True)
            kl_s = ent_s = 0.0
            nb = min(opts.batch_size, len(prepared))
            for _ in range(nb):
                if not order:
                    order = torch.randperm(len(prepared), generator=gen).tolist()
                kl, ent = objective(prepared[order.pop()], overrides_of(master))
                ((kl + opts.eta * ent) / nb).backward()
                kl_s += float(kl.detach()) / nb
                ent_s += float(ent.detach()) / nb
            opt.step()
            steps.append({"step": step, "kl": kl_s, "entropy": ent_s, "objective": kl_s + opts.eta * ent_s})
        after = evaluate(master)
    finally:
        hook.handle.remove()
        for n, p in q_model.named_parameters():
            p.requires_grad_(saved[n])
    new = {n: master[n].detach().to(tuned[n].dtype) for n in tuned}
    log = {"params": sorted(tuned), "n_params": sum(p.numel() for p in tuned.values()), "eta": opts.eta,
           "lr": opts.lr, "steps": steps, "before": before, "after": after, "seconds": time.perf_counter() - t0}
    return new, log
