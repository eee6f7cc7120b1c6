"""Q-VLM block reconstruction (METHODS.md §5): learned rounding over all Linears of a block of
consecutive decoder layers, minimizing the block's output error against the fp block.

Entry points (the search contract of ``types.py``):

- ``search_qvlm`` ("qvlm"): start from RTN, reconstruct with a plain MSE over all tokens.
- ``search_qvlm_mbq`` ("qvlm+mbq"): run MBQ per layer first (scales folded into the norms, MBQ's
  grid and clipping), then reconstruct on that grid with MBQ's modality weighting of the error.

The entropy profile and the partition that choose the blocks live in ``entropy.py`` and
``partition.py``; the rounding pieces in ``adaround.py``; visual-encoder optimization in ``veo.py``.
Free choices are options (``settings.options``): see ``QVLMOptions``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .adaround import LearnedRounding, beta_schedule, rounding_regularizer, ste_quantize_activations
from .entropy import EntropyProfile, soft_entropy  # noqa: F401  (re-exported for the pipeline)
from .partition import partition, plot_partition, quantile_threshold  # noqa: F401  (re-exported)
from .quantizer import QuantizedWeight, quantize, quantize_weight
from .types import BlockCalib, BlockResult, Sample, SearchSettings, quantizable_linears


@dataclass
class QVLMOptions:
    """Reconstruction options, read from ``settings.options`` (unknown keys are ignored)."""

    iters: int = 200
    lr: float = 1e-3
    batch_size: int = 4  # samples per Adam step
    round_lambda: float = 1e4  # weight of the mean rounding regularizer (the reconstruction term is 1 at the start grid)
    warmup: float = 0.2  # fraction of iterations without the regularizer
    beta_start: float = 20.0
    beta_end: float = 2.0
    recon_loss: str = "mse"  # "mse" | "mae" (per token: sum over channels)
    seed: int = 0
    fallback: bool = True  # keep the start codes when reconstruction did not lower the error
    device_cache_bytes: int = 1 << 30  # keep inputs + fp targets on the device up to this size
    mbq_ratio: str = "last_mlp"  # qvlm+mbq: which r weights vision tokens: last_mlp | mean

    @classmethod
    def from_settings(cls, options: Mapping[str, Any]) -> QVLMOptions:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in options.items() if k in names and v is not None}
        out = cls(**kw)
        if out.recon_loss not in ("mse", "mae"):
            raise ValueError(f"recon_loss must be mse|mae, got {out.recon_loss!r}")
        if out.iters < 0 or out.batch_size < 1:
            raise ValueError("iters must be >= 0 and batch_size >= 1")
        return out


# ------------------------------------------------------------------------------- block forward


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def run_block(
    layers: Sequence[nn.Module], hidden: torch.Tensor, layer_kwargs: dict[str, Any],
    params: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The block's output ``[T, C]`` for one sample; ``params[j]`` overrides parameters of layer j
    (relative names, e.g. ``"self_attn.q_proj.weight"``) without touching the modules."""
    h = hidden.unsqueeze(0)
    for j, layer in enumerate(layers):
        p = params[j] if params else {}
        out = functional_call(layer, dict(p), args=(h,), kwargs=layer_kwargs) if p else layer(h, **layer_kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return h.squeeze(0)


@contextlib.contextmanager
def activation_quant(linears: Sequence[nn.Module], bits: int) -> Iterator[None]:
    """Per-token fake quantization (straight-through) of every listed Linear's input, bits < 16."""
    handles = []
    if bits < 16:
        for lin in linears:
            handles.append(lin.register_forward_pre_hook(lambda _m, args: (ste_quantize_activations(args[0], bits),)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def frozen(layers: Sequence[nn.Module]) -> Iterator[None]:
    """No parameter gradients for the layers' own weights (restored afterwards)."""
    params = [p for layer in layers for p in layer.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)


# ------------------------------------------------------------------------------- losses


def token_weights(sample: Sample, vision_ratio: float | None) -> torch.Tensor | None:
    """MBQ weighting (answer 1, vision r, others 0), or None for a plain mean over all tokens."""
    if vision_ratio is None:
        return None
    ans = sample.answer_mask.reshape(-1).float()
    vis = sample.vision_mask.reshape(-1).float()
    return ans + float(vision_ratio) * vis


def error_terms(delta: torch.Tensor, weights: torch.Tensor | None, norm: str) -> torch.Tensor:
    """Numerator of the block error of one sample: ``sum_t w_t sum_c f(delta_tc)`` (float32)."""
    d = delta.float()
    per_tok = d.square().sum(-1) if norm == "mse" else d.abs().sum(-1)
    return per_tok.sum() if weights is None else (per_tok * weights).sum()


def error_count(sample: Sample, channels: int, vision_ratio: float | None) -> float:
    """Denominator: ``T * C`` (plain), ``(N_ans + N_vis) * C`` (MBQ weighting)."""
    if vision_ratio is None:
        return float(sample.hidden.shape[0] * channels)
    return float(int(sample.answer_mask.sum()) + int(sample.vision_mask.sum())) * channels


# ------------------------------------------------------------------------------- reconstruction


@dataclass
class _Item:
    x: torch.Tensor
    kwargs: dict[str, Any]
    target: torch.Tensor
    weights: torch.Tensor | None
    count: float


def _prepare(layers: Sequence[nn.Module], samples: Sequence[Sample], vision_ratio: float | None,
             device: torch.device, cache_bytes: int) -> list[_Item]:
    """Per sample: input, kwargs, fp block target, token weights. On the device if they fit."""
    items: list[_Item] = []
    total = 0
    with torch.no_grad():
        for s in samples:
            x = s.hidden.to(device)
            kw = _to(s.layer_kwargs, device)
            y = run_block(layers, x, kw)
            w = token_weights(s, vision_ratio)
            items.append(_Item(x, kw, y, None if w is None else w.to(device),
                               error_count(s, x.shape[-1], vision_ratio)))
            total += 2 * x.numel() * x.element_size()
    if not items:
        raise ValueError("qvlm: the block received no calibration samples")
    if total > cache_bytes and device.type != "cpu":
        pin = torch.cuda.is_available()
        for it in items:
            it.x, it.target = it.x.cpu(), it.target.cpu()
            if pin:
                it.x, it.target = it.x.pin_memory(), it.target.pin_memory()
    return items


def _params_of(weights: Mapping[str, torch.Tensor], fixed: Sequence[Mapping[str, torch.Tensor]],
               layer_ids: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Per-layer parameter overrides: fixed tensors (folded norms) + the Linears' weights."""
    out = [dict(f) for f in fixed]
    pos = {idx: j for j, idx in enumerate(layer_ids)}
    for name, w in weights.items():
        idx, rel = name.split(".", 1)
        out[pos[int(idx)]][f"{rel}.weight"] = w
    return out


@torch.no_grad()
def _block_error(layers, items: Sequence[_Item], params, norm: str, device: torch.device) -> tuple[float, float]:
    """(method's error, plain MSE) of the block over all items, with fixed weights."""
    num = den = sq = n = 0.0
    for it in items:
        y = run_block(layers, it.x.to(device), it.kwargs, params)
        d = y.float() - it.target.to(device).float()
        num += float(error_terms(d, it.weights, norm))
        den += it.count
        sq += float(d.square().sum())
        n += d.numel()
    return num / max(den, 1e-30), sq / max(n, 1)


def reconstruct_block(
    layers: list[nn.Module],
    layer_ids: list[int],
    samples: Sequence[Sample],
    settings: SearchSettings,
    start: Mapping[str, QuantizedWeight],
    fp_weights: Mapping[str, torch.Tensor] | None = None,
    fixed: Mapping[str, torch.Tensor] | None = None,
    vision_ratio: float | None = None,
    compare: Mapping[str, Mapping[str, QuantizedWeight]] | None = None,
) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """Learn the rounding of every Linear in ``start`` ("<idx>.<rel>") on its start grid.

    ``fp_weights``: the fp weight each rounding is relative to (default: the Linear's own weight;
    the folded weight for qvlm+mbq). ``fixed``: fp parameter overrides ("<idx>.<rel param>", e.g.
    folded norms) used by the quantized block. ``vision_ratio``: MBQ weighting, None for plain.
    ``compare``: other code sets to report the block error of (e.g. {"rtn": ...}).
    Returns the hardened weights (same scale/zero as ``start``) and JSON-able metrics.
    """
    t0 = time.perf_counter()
    opts = QVLMOptions.from_settings(settings.options)
    device = next(layers[0].parameters()).device
    pos = {idx: j for j, idx in enumerate(layer_ids)}
    fixed_per_layer: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    for name, t in (fixed or {}).items():
        idx, rel = name.split(".", 1)
        ref = layers[pos[int(idx)]].get_parameter(rel)
        fixed_per_layer[pos[int(idx)]][rel] = t.to(device=ref.device, dtype=ref.dtype)
    linears = [lin for layer in layers for lin in quantizable_linears(layer, settings.groups).values()]

    with frozen(layers):  # fp targets without activation quantization
        items = _prepare(layers, samples, vision_ratio, device, opts.device_cache_bytes)
    with frozen(layers), activation_quant(linears, settings.abits):
        roundings: dict[str, LearnedRounding] = {}
        for name, qw in start.items():
            idx, rel = name.split(".", 1)
            lin = layers[pos[int(idx)]].get_submodule(rel)
            w = fp_weights[name] if fp_weights and name in fp_weights else lin.weight.detach()
            roundings[name] = LearnedRounding(w.to(device), qw.scale.to(device),
                                              None if qw.zero is None else qw.zero.to(device), qw.scheme).to(device)

        def fixed_params(codes: Mapping[str, QuantizedWeight]) -> list[dict[str, torch.Tensor]]:
            deq = {}
            for name, qw in codes.items():
                idx, rel = name.split(".", 1)
                deq[name] = qw.dequantize(layers[pos[int(idx)]].get_parameter(f"{rel}.weight").dtype).to(device)
            return _params_of(deq, fixed_per_layer, layer_ids)

        err_start, mse_start = _block_error(layers, items, fixed_params(start), opts.recon_loss, device)
        extra = {k: _block_error(layers, items, fixed_params(v), opts.recon_loss, device) for k, v in (compare or {}).items()}
        ref = err_start if err_start > 0 else 1.0

        vs = [r.v for r in roundings.values()]
        n_weights = sum(v.numel() for v in vs)
        opt = torch.optim.Adam(vs, lr=opts.lr)
        gen = torch.Generator().manual_seed(opts.seed)
        order: list[int] = []
        curve: list[dict[str, float]] = []
        log_every = max(1, opts.iters // 10)
        for it in range(opts.iters):
            batch = []
            for _ in range(min(opts.batch_size, len(items))):
                if not order:
                    order = torch.randperm(len(items), generator=gen).tolist()
                batch.append(items[order.pop()])
            den = sum(b.count for b in batch)
            opt.zero_grad(set_to_none=True)
            rec = 0.0
            if den > 0:
                # Soft weights once per step, as detached leaves: every sample's backward stops at
                # them (accumulating dL/dW_soft), then one backward carries the sum into V.
                soft = {n: r.soft_weight() for n, r in roundings.items()}
                leaves = {n: w.detach().requires_grad_(True) for n, w in soft.items()}
                overrides = _params_of(leaves, fixed_per_layer, layer_ids)
                for b in batch:
                    y = run_block(layers, b.x.to(device), b.kwargs, overrides)
                    loss = error_terms(y.float() - b.target.to(device).float(), b.weights, opts.recon_loss) / (den * ref)
                    loss.backward()
                    rec += float(loss.detach())
                names = [n for n in soft if leaves[n].grad is not None]
                torch.autograd.backward([soft[n] for n in names], [leaves[n].grad for n in names])
                del soft, leaves, overrides
            beta = beta_schedule(it, opts.iters, opts.warmup, opts.beta_start, opts.beta_end)
            reg = 0.0
            if beta is not None and opts.round_lambda > 0:
                for m in roundings.values():  # one Linear at a time: its temporaries only
                    r = rounding_regularizer(m.h(), beta) * (m.v.numel() / n_weights)
                    (opts.round_lambda * r).backward()
                    reg += float(r.detach())
            opt.step()
            if it % log_every == 0 or it == opts.iters - 1:
                curve.append({"iter": it, "rec": rec, "reg": reg, "beta": -1.0 if beta is None else beta})

        quantized = {name: r.quantized() for name, r in roundings.items()}
        err_after, mse_after = _block_error(layers, items, fixed_params(quantized), opts.recon_loss, device)
        gap = sum(r.soft_hard_gap() * r.v.numel() for r in roundings.values()) / max(n_weights, 1)

    fell_back = opts.fallback and not err_after < err_start
    flipped = sum(int((quantized[n].qweight != start[n].qweight.to(device)).sum()) for n in quantized)
    metrics: dict[str, Any] = {
        "block_layers": list(layer_ids),
        "iters": opts.iters, "lr": opts.lr, "batch_size": opts.batch_size, "round_lambda": opts.round_lambda,
        "loss": opts.recon_loss, "weighting": "plain" if vision_ratio is None else "mbq",
        "vision_ratio": vision_ratio, "abits": settings.abits,
        "act_quant": "none" if settings.abits >= 16 else ("per-token int8" if settings.abits == 8 else "fake (eval only)"),
        "n_samples": len(items), "n_tokens": sum(it.x.shape[0] for it in items),
        "error_start": err_start, "error_after": err_after, "mse_start": mse_start, "mse_after": mse_after,
        **{f"error_{k}": v[0] for k, v in extra.items()}, **{f"mse_{k}": v[1] for k, v in extra.items()},
        "error_final": err_start if fell_back else err_after,
        "improvement": 1 - err_after / err_start if err_start > 0 else 0.0,
        "flipped_fraction": flipped / max(n_weights, 1), "soft_hard_gap": gap,
        "loss_curve": curve, "fell_back": bool(fell_back), "seconds": time.perf_counter() - t0,
    }
    chosen = start if fell_back else quantized
    quantized = {n: QuantizedWeight(q.qweight.detach().clone().cpu(), q.scale.cpu(),
                                    None if q.zero is None else q.zero.cpu(), q.scheme) for n, q in chosen.items()}
    return quantized, metrics


# ------------------------------------------------------------------------------- entry points


def search_qvlm(
    layers: list[nn.Module], layer_ids: list[int], calib: BlockCalib, settings: SearchSettings
) -> BlockResult:
    """"qvlm": RTN grid, learned rounding, plain MSE of the block output over all tokens."""
    if calib is None:
        raise ValueError("qvlm needs calibration samples")
    start = {}
    for layer, idx in zip(layers, layer_ids):
        for name, lin in quantizable_linears(layer, settings.groups).items():
            start[f"{idx}.{name}"] = quantize_weight(lin.weight.data, settings.scheme, settings.scale_dtype)
    quantized, metrics = reconstruct_block(layers, layer_ids, list(calib.samples), settings, start)
    metrics = {"method": "qvlm", **metrics, "error_rtn": metrics["error_start"]}
    return BlockResult(quantized=quantized, replaced={}, metrics=metrics)


def search_qvlm_mbq(
    layers: list[nn.Module], layer_ids: list[int], calib: BlockCalib, settings: SearchSettings
) -> BlockResult:
    """"qvlm+mbq": MBQ per layer (on each layer's fp inputs), then learned rounding on MBQ's
    grid over the whole block, the error weighted by modality (answer 1, vision r, others 0)."""
    return search_on_top(mbq_start_layer, "qvlm+mbq", layers, layer_ids, calib, settings)


StartLayer = Callable[[nn.Module, int, Sequence[Sample], SearchSettings, Any],
                      tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]]


@torch.no_grad()
def mbq_start_layer(layer: nn.Module, idx: int, samples: Sequence[Sample], settings: SearchSettings,
                    sensitivity: Any) -> tuple[dict, dict, dict, dict]:
    """MBQ on one layer (``mbq.search_mbq``'s per-layer step), also returning the folded fp weight of
    every Linear: the weight MBQ's codes round, which the learned rounding is relative to.
    Returns (quantized, replaced, metrics, fp weights), names relative to the layer."""
    from .awq import ScaleOptions, choose_grid, scale_search_layer
    from .groups import folded_tensors
    from .mbq import layer_ratios, mbq_weighting

    opts = ScaleOptions.from_options(settings.options)
    ratios = layer_ratios(sensitivity, idx)
    grid = choose_grid(opts.grid)
    scales: dict[str, torch.Tensor] = {}

    def choose(group, inputs, w, loss):  # the grid search, recording the chosen scales
        s, info = grid(group, inputs, w, loss)
        scales[group.name] = s.detach().clone()
        return s, info

    q, r, m = scale_search_layer(layer, samples, settings, lambda g: mbq_weighting(g, ratios, opts.loss), choose,
                                 clip=opts.clip, clip_weighted=opts.mbq_clip_weighting)
    m["sensitivity"] = ratios
    folded = folded_tensors(layer, settings.groups, scales)
    fp = {n: folded.get(f"{n}.weight", layer.get_parameter(f"{n}.weight").detach()).float() for n in q}
    return q, r, m, fp


def search_on_top(
    start_layer: StartLayer, method: str,
    layers: list[nn.Module], layer_ids: list[int], calib: BlockCalib, settings: SearchSettings,
) -> BlockResult:
    """Run a per-layer scale search (``start_layer``, e.g. MBQ) on each layer's fp inputs, then
    reconstruct the whole block on its grid and with MBQ's modality weighting."""
    if calib is None:
        raise ValueError(f"{method} needs calibration samples")
    samples = list(calib.samples)
    opts = QVLMOptions.from_settings(settings.options)
    quantized: dict[str, QuantizedWeight] = {}
    replaced: dict[str, torch.Tensor] = {}
    fp_weights: dict[str, torch.Tensor] = {}
    start_metrics: dict[str, Any] = {}
    cur = samples
    for j, (layer, idx) in enumerate(zip(layers, layer_ids)):
        with torch.no_grad():
            q, r, m, fp = start_layer(layer, idx, cur, settings, calib.sensitivity)
            if j + 1 < len(layers):  # fp inputs of the next layer
                dev = next(layer.parameters()).device
                cur = [Sample(run_block([layer], s.hidden.to(dev), _to(s.layer_kwargs, dev)).to(s.hidden.device),
                              s.layer_kwargs, s.vision_mask, s.answer_mask) for s in cur]
        quantized.update({f"{idx}.{n}": v for n, v in q.items()})
        replaced.update({f"{idx}.{n}": v for n, v in r.items()})
        fp_weights.update({f"{idx}.{n}": v for n, v in fp.items()})
        start_metrics[str(idx)] = m
    del cur
    agreement = code_agreement(fp_weights, quantized)
    ratio = vision_ratio_for(calib.sensitivity, layer_ids, opts.mbq_ratio)
    rtn = {}
    for layer, idx in zip(layers, layer_ids):
        for name, lin in quantizable_linears(layer, settings.groups).items():
            rtn[f"{idx}.{name}"] = quantize_weight(lin.weight.data, settings.scheme, settings.scale_dtype)
    fixed = {k: v for k, v in replaced.items() if k.rsplit(".", 1)[0] not in quantized}
    q, metrics = reconstruct_block(layers, layer_ids, samples, settings, quantized, fp_weights, fixed, ratio,
                                   compare={"rtn": rtn})
    metrics = {"method": method, **metrics, "start_code_agreement": agreement, "start": start_metrics}
    return BlockResult(quantized=q, replaced=replaced, metrics=metrics)


def vision_ratio_for(sensitivity: Mapping[Any, Mapping[str, float]] | None, layer_ids: Sequence[int],
                     how: str = "last_mlp") -> float:
    """MBQ's r for a block's output error: r_mlp of the block's last layer (the block output is the
    residual stream after that MLP, where MBQ measures r_mlp), or the mean of all r in the block."""
    if not sensitivity:
        raise ValueError("qvlm+mbq needs calib.sensitivity ({layer: {'r_attn', 'r_mlp'}})")

    def get(i: int) -> Mapping[str, float]:
        return sensitivity[i] if i in sensitivity else sensitivity[str(i)]

    if how == "last_mlp":
        return float(get(layer_ids[-1])["r_mlp"])
    if how == "mean":
        vals = [float(get(i)[k]) for i in layer_ids for k in ("r_attn", "r_mlp")]
        return sum(vals) / len(vals)
    raise ValueError(f"mbq_ratio must be last_mlp|mean, got {how!r}")


@torch.no_grad()
def code_agreement(fp_weights: Mapping[str, torch.Tensor], start: Mapping[str, QuantizedWeight]) -> float:
    """Fraction of start codes that RTN of the fp weights on the start grid reproduces (1.0 up to
    clipping ties): checks that the learned rounding is relative to the weight the start rounded."""
    agree = total = 0
    for name, qw in start.items():
        w = fp_weights[name]
        codes = quantize(w, qw.scale.to(w.device), None if qw.zero is None else qw.zero.to(w.device), qw.scheme)
        agree += int((codes == qw.qweight.to(w.device)).sum())
        total += codes.numel()
    return agree / max(total, 1)
