"""AWQ (METHODS.md §3): per-channel scale search on a grid, folding, clip search, then RTN.

Also the engine MBQ and SmoothQuant reuse: they differ only in how tokens weigh in the loss
(``Weighting``) and in how a group's scales are chosen (``choose``). Per decoder layer and group:

1. capture the group's fp input X (every calibration token, one group at a time);
2. choose s (AWQ: ``s = xbar^alpha`` normalized, alpha on a grid, minimizing the group's output
   loss of the candidate ``Q(W * s) / s``);
3. clip search on the scaled weights (per row and group of G inputs, shrink max|W|);
4. after all groups: fold every s (prev op / s, Linear columns * s) and quantize every Linear.

All losses are measured in each group's own frame (its inputs and its Linears' fp outputs as
the unquantized layer computes them), so "RTN", "scaled" and "clipped" numbers compare directly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .groups import (GroupInputs, TokenChunk, Weighting, capture_group_inputs, capture_groups_inputs,
                     compute_dtype, error_sum, foldable, folded_tensors, is_qk, replay)
from .quantizer import (QuantizedWeight, QuantScheme, compute_qparams, fake_quantize_activations,
                        quantize_weight)
from .types import BlockCalib, BlockResult, LinearGroup, Sample, SearchSettings


@dataclass(frozen=True)
class ScaleOptions:
    """Recipe options the scale searches read from ``SearchSettings.options``."""

    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    clip: bool = True
    clip_tokens: int = 512  # token subsample for the clip search
    # llm-awq does not clip q_proj/k_proj: their outputs only matter through q @ k^T and the
    # softmax, so a per-output error is a poor proxy there and clipping them can hurt attention.
    clip_skip_qk: bool = True
    clip_grid: int = 20  # ratios 1 - i/clip_grid ...
    clip_max_shrink: float = 0.5  # ... down to 1 - clip_max_shrink (inclusive): 1.0, 0.95, ..., 0.5
    mbq_clip_weighting: bool = True  # MBQ: modality weights inside the clip search too (our extension)
    loss: str = "mae"  # MBQ's norm; AWQ always uses mse
    chunk_tokens: int = 2048  # tokens per matmul in loss evaluation
    clip_budget: int = 1 << 24  # max elements of one [tokens, rows, groups] clip-error tensor
    search_dtype: str = "auto"  # "auto": fp32 on CPU, the activations' 16-bit dtype on CUDA | "float32"
    alpha: float = 0.5  # SmoothQuant migration strength
    # capture every group's inputs in one layer pass (peak: all groups' inputs, as the planner
    # counts) rather than one pass per group (peak: one group's inputs, 3 more layer forwards)
    capture_together: bool = True
    # squared-error loss through the inputs' Gram matrix (exact, cheaper; see gram_pays): None = when
    # it pays, False = never (the direct form), True = always (where the loss allows it)
    gram: bool | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ScaleOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in known and v is not None})

    def clip_ratios(self) -> list[float]:
        n = int(round(self.clip_max_shrink * self.clip_grid))
        return [1.0 - i / self.clip_grid for i in range(n + 1)]


def grid_alphas(n: int) -> list[float]:
    return [i / n for i in range(n)]


def awq_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = xbar^alpha``, normalized so that ``max(s) * min(s) == 1``.

    A channel that is exactly 0 on every token gets the floor 1e-4 (otherwise s = 0 cannot fold)."""
    s = absmean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def fake_quant(w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype) -> torch.Tensor:
    """``quantize_weight(w).dequantize()`` without the integer round trip (same values, to the bit:
    the codes are small integers, exact in fp32); the inner loop of every search."""
    scale, zero = compute_qparams(w, scheme, scale_dtype)
    out_f, in_f = w.shape
    wg = w.detach().float().reshape(out_f, scheme.n_groups(in_f), -1)
    s = scale.float().unsqueeze(-1)
    q = torch.round(wg / s)
    if zero is not None:
        z = zero.float().unsqueeze(-1)
        q = (q + z).clamp_(scheme.qmin, scheme.qmax) - z
    else:
        q = q.clamp_(scheme.qmin, scheme.qmax)
    return (q * s).reshape(out_f, in_f).to(w.dtype)


def clamp_groups(w: torch.Tensor, ratio: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Clamp each (row, group of G inputs) to ``[-r max|W|, r max|W|]``; ``ratio`` is [out, n_groups]."""
    out_f, in_f = w.shape
    wg = w.reshape(out_f, scheme.n_groups(in_f), -1)
    m = wg.abs().amax(-1, keepdim=True) * ratio.to(w.dtype).unsqueeze(-1)
    return torch.maximum(torch.minimum(wg, m), -m).reshape(out_f, in_f)


# ------------------------------------------------------------------------- loss evaluation


class GroupLoss:
    """Evaluates a group's loss for candidate (s, quantized scaled weights) over all its tokens.

    The candidate output is ``A(X / s) @ Q(W s)^T`` (A = per-token int8 when abits == 8, else
    identity); the fp output ``X @ W^T``. Their difference is formed from small terms
    (``X_s @ (Q(Ws) - Ws)^T + (A(X_s) - X_s) @ Q(Ws)^T``) so 16-bit matmuls on GPU lose nothing
    to cancellation.
    """

    def __init__(self, inputs: GroupInputs, w: torch.Tensor, weighting: Weighting, abits: int,
                 mm_dtype: torch.dtype, gram: bool | None = None):
        self.inputs = inputs
        self.w = w  # [O, in] fp weights of the group's Linears, rows concatenated, compute dtype
        self.weighting = weighting
        self.abits = abits
        self.mm_dtype = mm_dtype
        denom = weighting.token_count(inputs.chunks) * w.shape[0]
        if denom == 0:
            raise ValueError("the loss has no weighted tokens (MBQ needs answer or vision tokens)")
        self.denom = float(denom)
        if gram is None:
            gram = gram_pays(weighting.norm, abits, inputs.n_tokens, w.shape[1], w.shape[0])
        self.gram = weighted_gram(inputs, weighting) if gram else None

    def __call__(self, s: torch.Tensor, wq: torch.Tensor) -> float:
        if self.gram is not None:
            return gram_loss(self.gram, (wq - self.w * s) / s) / self.denom
        dw = (wq - self.w * s).to(self.mm_dtype).T
        wq_t = wq.to(self.mm_dtype).T
        total = torch.zeros((), dtype=torch.float64, device=wq.device)
        for c in self.inputs.chunks:
            xs = c.x.to(s.dtype) / s
            d = xs.to(self.mm_dtype) @ dw
            if self.abits < 16:
                d = d + (fake_quantize_activations(xs, self.abits) - xs).to(self.mm_dtype) @ wq_t
            total += error_sum(d, self.weighting.token_weights(c), self.weighting.norm)
        return float(total) / self.denom


# The squared-error loss has a cheaper exact form: with D the token weights and G = X^T D X,
#   sum_t w_t |(x_t / s) (Q(Ws) - Ws)^T|^2 = trace(A G A^T),  A = (Q(Ws) - Ws) / s (columns).
# One [in, in] Gram matrix per group, then O x in^2 per candidate instead of T x in x O: 7-14x fewer
# multiply-adds for a 7B layer's qkv, o and gate/up groups at 48k tokens (in = 3584). Not for |.|
# (MBQ's default), not with activation quantization (nonlinear in X / s), and not where in is
# large against the tokens (down_proj's in = 18944).

GRAM_MAX_IN = 16384  # an in x in fp32 matrix: 1 GiB at this size
GRAM_CANDIDATES = 21  # loss evaluations a group makes (the alpha grid + the clipped weights)


def gram_pays(norm: str, abits: int, n_tokens: int, in_f: int, out_f: int) -> bool:
    """Whether the Gram form of the loss costs less than the direct one (counting the Gram
    matrix itself, and its fp32 matmuls at half the rate of the direct path's 16-bit ones)."""
    if norm != "mse" or abits < 16 or in_f > GRAM_MAX_IN:
        return False
    direct = GRAM_CANDIDATES * n_tokens * in_f * out_f
    gram = 2 * (n_tokens * in_f * in_f + GRAM_CANDIDATES * out_f * in_f * in_f)
    return gram < direct


@contextlib.contextmanager
def _fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls on tensor cores (TF32: 10 mantissa bits, finer than the 8 of the bf16 direct
    path), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def weighted_gram(inputs: GroupInputs, weighting: Weighting) -> torch.Tensor:
    """``G = sum_t w_t x_t^T x_t`` over every token, [in, in] (the loss's weights: MBQ's modality
    weights, or 1 for AWQ); fp32, or float64 for float64 inputs."""
    x0 = inputs.chunks[0].x
    dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    g = torch.zeros(x0.shape[1], x0.shape[1], dtype=dt, device=x0.device)
    with _fp32_matmuls():
        for c in inputs.chunks:
            x = c.x.to(dt)
            wt = weighting.token_weights(c)
            g.addmm_((x * wt.to(dt)[:, None]).T if wt is not None else x.T, x)
    return g


def gram_loss(gram: torch.Tensor, a: torch.Tensor) -> float:
    """``trace(A G A^T)`` for ``A`` [O, in]: the weighted squared error sum (summed in float64)."""
    a = a.to(gram.dtype)
    with _fp32_matmuls():
        return float(((a @ gram) * a).sum(dtype=torch.float64))


# ------------------------------------------------------------------------------ clip search


@torch.no_grad()
def clip_search(
    w: torch.Tensor,
    xs: torch.Tensor,
    weights: torch.Tensor | None,
    norm: str,
    scheme: QuantScheme,
    scale_dtype: torch.dtype,
    abits: int,
    ratios: Sequence[float],
    budget: int = 1 << 24,
    gram: bool = True,
) -> torch.Tensor:
    """Best shrink ratio per (output row, input group) of one Linear: ``[out, n_groups]``.

    ``w`` [out, in] is the scaled weight, ``xs`` [n, in] its (scaled) input. Each (row, group) is
    judged by the error of its own partial product ``X_g . (Q(clamp(W_og)) - W_og)`` over the
    tokens (weighted), as llm-awq does; ties keep the larger ratio.
    """
    out_f, in_f = w.shape
    ng = scheme.n_groups(in_f)
    gs = in_f // ng
    n = xs.shape[0]
    xg = xs.reshape(n, ng, -1)
    eg = (fake_quantize_activations(xs, abits) - xs).reshape(n, ng, -1) if abits < 16 else None
    wt = None if weights is None else weights.to(xs.dtype)[:, None, None]
    # Squared error: sum_t w_t (X_tg . d_og)^2 = d_og^T G_g d_og with G_g = X_g^T D X_g, the group's
    # [gs, gs] block of the weighted Gram matrix: gs instead of n multiply-adds per weight.
    blocks = None
    if gram and norm == "mse" and eg is None and gs < n:
        xw = xg * wt if wt is not None else xg
        blocks = torch.einsum("tgk,tgl->gkl", xw, xg)
    best = torch.ones(out_f, ng, dtype=w.dtype, device=w.device)
    rows = max(1, budget // max(1, (gs if blocks is not None else n) * ng))
    for r0 in range(0, out_f, rows):
        wc = w[r0:r0 + rows]
        best_err = None
        for ratio in ratios:
            cand = wc if ratio == 1.0 else clamp_groups(wc, torch.full((wc.shape[0], ng), ratio, device=w.device,
                                                                       dtype=w.dtype), scheme)
            wq = fake_quant(cand, scheme, scale_dtype)
            delta = (wq - wc).reshape(wc.shape[0], ng, -1)
            if blocks is not None:
                err = (torch.einsum("ogk,gkl->ogl", delta, blocks) * delta).sum(-1)
            else:
                part = torch.einsum("tgk,ogk->tog", xg, delta)
                if eg is not None:
                    part = part + torch.einsum("tgk,ogk->tog", eg, wq.reshape(wc.shape[0], ng, -1))
                f = part.abs() if norm == "mae" else part.square()
                err = (f * wt).sum(0) if wt is not None else f.sum(0)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0:r0 + rows][better] = ratio
    return best


def linear_error(w: torch.Tensor, wq: torch.Tensor, chunk: TokenChunk, s: torch.Tensor,
                 weighting: Weighting, abits: int) -> float:
    """Weighted output error of one Linear on ``chunk`` (frame: input X/s, weights W*s)."""
    xs = chunk.x.to(s.dtype) / s
    d = xs @ (wq - w).T
    if abits < 16:
        d = d + (fake_quantize_activations(xs, abits) - xs) @ wq.T
    return float(error_sum(d, weighting.token_weights(chunk), weighting.norm))


# ------------------------------------------------------------------------------ the engine


Choose = Callable[[LinearGroup, GroupInputs, torch.Tensor, Callable[[torch.Tensor], float]],
                  tuple[torch.Tensor, dict[str, Any]]]


def choose_grid(n: int) -> Choose:
    """AWQ/MBQ: the best alpha of the grid (alpha = 0, s = 1, is RTN and is always a candidate)."""

    def choose(group: LinearGroup, inputs: GroupInputs, w: torch.Tensor,
               loss: Callable[[torch.Tensor], float]) -> tuple[torch.Tensor, dict[str, Any]]:
        losses = []
        best = (math.inf, 0.0, None)
        for a in grid_alphas(n):
            s = awq_scales(inputs.absmean, a)
            lo = loss(s)
            losses.append(lo)
            if lo < best[0]:
                best = (lo, a, s)
        return best[2], {"alpha": best[1], "loss_rtn": losses[0], "loss_scaled": best[0], "grid": losses}

    return choose


def search_dtype(opts: ScaleOptions, device: torch.device | str, act_dtype: torch.dtype) -> torch.dtype:
    if opts.search_dtype == "float32" or torch.device(device).type == "cpu":
        return compute_dtype(act_dtype)
    return act_dtype


def fp_samples(samples: Sequence[Sample], before: Sequence[nn.Module]) -> Iterator[Sample]:
    """Samples as the layer after ``before`` sees them (fp forward through ``before``)."""
    for smp in samples:
        h = smp.hidden
        for layer in before:
            with torch.no_grad():
                h = replay(layer, Sample(h, smp.layer_kwargs, smp.vision_mask, smp.answer_mask))
        yield Sample(h, smp.layer_kwargs, smp.vision_mask, smp.answer_mask)


class _Replay:
    """A re-iterable view of samples shifted through earlier fp layers of the block."""

    def __init__(self, samples: Sequence[Sample], before: Sequence[nn.Module]):
        self.samples, self.before = samples, before

    def __iter__(self) -> Iterator[Sample]:
        return fp_samples(self.samples, self.before) if self.before else iter(self.samples)


@torch.no_grad()
def scale_search_layer(
    layer: nn.Module,
    samples: Any,
    settings: SearchSettings,
    weighting_for: Callable[[LinearGroup], Weighting],
    choose: Choose,
    clip: bool,
    clip_weighted: bool = True,
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """One decoder layer: choose scales per group, clip, fold, quantize. Does not modify ``layer``.

    Returns ({rel Linear path: QuantizedWeight}, {rel param path: folded fp tensor}, metrics),
    tensors on the CPU. Metrics: per group ``kind``, ``weight`` (MBQ's r or None), ``alpha``,
    ``loss_rtn`` / ``loss_scaled`` / ``loss_clip`` / ``loss_final``, ``grid`` (loss per alpha),
    ``clip`` (per Linear mean/min ratio), ``skipped`` (why a group was not scaled); and
    ``time_s`` per phase.
    """
    opts = ScaleOptions.from_options(settings.options)
    device = torch.device(settings.device)
    scales: dict[str, torch.Tensor] = {}
    ratios: dict[str, torch.Tensor] = {}
    metrics: dict[str, Any] = {}
    times = {"capture": 0.0, "scales": 0.0, "clip": 0.0, "finalize": 0.0}
    t0 = time.perf_counter()
    captured = (capture_groups_inputs(layer, samples, [g.linears[0] for g in settings.groups], device,
                                      opts.chunk_tokens) if opts.capture_together else {})
    times["capture"] += time.perf_counter() - t0
    for group in settings.groups:
        t0 = time.perf_counter()
        why_not = foldable(layer, group)
        inputs = captured.pop(group.linears[0], None) or capture_group_inputs(layer, samples, group.linears[0],
                                                                              device, opts.chunk_tokens)
        cdt = compute_dtype(inputs.chunks[0].x.dtype)
        ws = [layer.get_parameter(f"{n}.weight").detach().to(device=device, dtype=cdt) for n in group.linears]
        w = torch.cat(ws)
        weighting = weighting_for(group)
        gram = opts.gram if opts.gram is not True else (weighting.norm == "mse" and settings.abits >= 16)
        gl = GroupLoss(inputs, w, weighting, settings.abits, search_dtype(opts, device, inputs.chunks[0].x.dtype),
                       gram=gram)
        t1 = time.perf_counter()

        def loss(s: torch.Tensor) -> float:
            return gl(s, fake_quant(w * s, settings.scheme, settings.scale_dtype))

        m: dict[str, Any] = {"kind": group.kind, "weight": weighting.vision_weight}
        if why_not is None:
            s, info = choose(group, inputs, w, loss)
            scales[group.name] = s
            m.update(info)
        else:
            s = torch.ones(w.shape[1], dtype=cdt, device=device)
            lo = loss(s)
            m.update({"alpha": 0.0, "loss_rtn": lo, "loss_scaled": lo, "skipped": why_not})
        t2 = time.perf_counter()
        if clip:
            clip_weighting = Weighting(weighting.norm, weighting.vision_weight if clip_weighted else None)
            m["clip"], wq = _clip_group(group, ws, s, inputs.subsample(opts.clip_tokens), clip_weighting, settings,
                                        opts, ratios)
            m["loss_clip"] = gl(s, wq)
        else:
            for name, wi in zip(group.linears, ws):
                ratios[name] = torch.ones(wi.shape[0], settings.scheme.n_groups(wi.shape[1]), dtype=cdt, device=device)
        m["loss_final"] = m["loss_clip"] if clip else m["loss_scaled"]
        metrics[group.name] = m
        del inputs, gl
        times["capture"] += t1 - t0
        times["scales"] += t2 - t1
        times["clip"] += time.perf_counter() - t2
    t3 = time.perf_counter()
    quantized, replaced = _finalize(layer, settings, scales, ratios)
    times["finalize"] = time.perf_counter() - t3
    metrics["time_s"] = {k: round(v, 4) for k, v in times.items()}
    return quantized, replaced, metrics


def _clip_group(group: LinearGroup, ws: list[torch.Tensor], s: torch.Tensor, sub: TokenChunk, weighting: Weighting,
                settings: SearchSettings, opts: ScaleOptions,
                ratios: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
    """Clip search of every Linear of a group in its scaled frame (weights W*s, inputs X/s).

    Fills ``ratios`` ({Linear: [out, n_groups]}); returns (metrics, the group's clipped fake-quant
    weights, rows concatenated)."""
    scheme, sd, abits = settings.scheme, settings.scale_dtype, settings.abits
    clip_m: dict[str, Any] = {}
    parts = []
    xs = sub.x.to(s.dtype) / s
    for name, wi in zip(group.linears, ws):
        wsc = wi * s
        r = torch.ones(wi.shape[0], scheme.n_groups(wi.shape[1]), dtype=wi.dtype, device=wi.device)
        if opts.clip_skip_qk and is_qk(name):
            clip_m[name] = {"mean": 1.0, "min": 1.0, "skipped": "q/k"}
        else:
            r = clip_search(wsc, xs, weighting.token_weights(sub), weighting.norm, scheme, sd, abits,
                            opts.clip_ratios(), opts.clip_budget, gram=opts.gram is not False)
            before = linear_error(wsc, fake_quant(wsc, scheme, sd), sub, s, weighting, abits)
            after = linear_error(wsc, fake_quant(clamp_groups(wsc, r, scheme), scheme, sd), sub, s, weighting, abits)
            reverted = not after < before  # per-group choices are greedy: never accept a worse Linear
            if reverted:
                r = torch.ones_like(r)
            clip_m[name] = {"mean": float(r.mean()), "min": float(r.min()), "reverted": reverted}
        ratios[name] = r
        parts.append(fake_quant(clamp_groups(wsc, r, scheme), scheme, sd))
    return clip_m, torch.cat(parts)


def _finalize(layer: nn.Module, settings: SearchSettings, scales: dict[str, torch.Tensor],
              ratios: dict[str, torch.Tensor]) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """Fold all scales, clamp by the clip ratios, RTN every Linear; the fp tensors folding changed."""
    folded = folded_tensors(layer, settings.groups, scales)
    quantized: dict[str, QuantizedWeight] = {}
    for g in settings.groups:
        for name in g.linears:
            key = f"{name}.weight"
            w = folded.get(key)
            if w is None:
                p = layer.get_parameter(key).detach()
                w = p.to(compute_dtype(p.dtype))
            w = clamp_groups(w.to(ratios[name].device), ratios[name], settings.scheme)
            qw = quantize_weight(w, settings.scheme, settings.scale_dtype)
            # left on the search's device: the part writer packs there (on the CPU, packing a
            # 7B layer's codes took 3 s a block, as long as the search itself on an H100)
            quantized[name] = qw
    replaced = {}
    for key, value in folded.items():
        if key.endswith(".weight") and key[: -len(".weight")] in quantized:
            continue  # a quantized Linear's weight: written as codes, not as fp
        replaced[key] = value.to(layer.get_parameter(key).dtype).cpu()
    return quantized, replaced


def run_block(
    layers: list[nn.Module],
    layer_ids: list[int],
    calib: BlockCalib,
    settings: SearchSettings,
    per_layer: Callable[[nn.Module, int, Any], tuple[dict, dict, dict]],
    method: str,
) -> BlockResult:
    """Apply ``per_layer(layer, layer_idx, samples)`` to each layer of a block, prefixing names."""
    if calib is None or not len(calib.samples):
        raise ValueError(f"{method} needs calibration samples")
    quantized, replaced, metrics = {}, {}, {"method": method, "layers": {}}
    for k, (layer, idx) in enumerate(zip(layers, layer_ids)):
        q, r, m = per_layer(layer, idx, _Replay(calib.samples, layers[:k]))
        quantized.update({f"{idx}.{n}": v for n, v in q.items()})
        replaced.update({f"{idx}.{n}": v for n, v in r.items()})
        metrics["layers"][str(idx)] = m
    return BlockResult(quantized=quantized, replaced=replaced, metrics=metrics)


def search_awq(
    layers: list[nn.Module], layer_ids: list[int], calib: BlockCalib, settings: SearchSettings
) -> BlockResult:
    """AWQ: grid search of ``s = xbar^alpha`` per group on the plain MSE over all tokens, then clip."""
    opts = ScaleOptions.from_options(settings.options)

    def per_layer(layer: nn.Module, idx: int, samples: Any) -> tuple[dict, dict, dict]:
        return scale_search_layer(layer, samples, settings, lambda g: Weighting("mse", None),
                                  choose_grid(opts.grid), clip=opts.clip)

    return run_block(layers, layer_ids, calib, settings, per_layer, "awq")
