"""What the scale searches (AWQ, MBQ, SmoothQuant) share: a group's fp inputs, token-weighted
output losses, and folding per-channel scales into the op that feeds a group.

Folding is the exact identity ``(x / s) @ (W * s)^T == x @ W^T``: the previous op's output
channels are divided by ``s`` (a norm's weight and bias, or a Linear's rows and bias) and the
group's Linears' input columns multiplied by ``s``. In fp it changes nothing; it only moves
difficulty from activations into weights before quantization.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .types import LinearGroup, Sample, layer_forward

# ------------------------------------------------------------------------------------ devices


def to_device(value: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Tensors (also inside tuples/dicts) to ``device``, floating ones to ``dtype`` when given."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return value


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def replay(layer: nn.Module, sample: Sample) -> torch.Tensor:
    """``layer_forward`` on the layer's own device and dtype (a sample may be stored elsewhere)."""
    dev, dt = module_device(layer), module_dtype(layer)
    return layer_forward(layer, sample.hidden.to(device=dev, dtype=dt), to_device(sample.layer_kwargs, dev, dt))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the search's own math runs in: float64 stays float64, 16-bit becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ group inputs


@dataclass
class TokenChunk:
    """Up to ``chunk_tokens`` rows of a group's fp input, with the modality of each token."""

    x: torch.Tensor  # [n, in] in the model's dtype
    vision: torch.Tensor  # [n] bool
    answer: torch.Tensor  # [n] bool


@dataclass
class GroupInputs:
    """Every calibration token's input to one group (samples concatenated; no padding exists)."""

    chunks: list[TokenChunk]
    absmean: torch.Tensor  # [in] mean |X| over all tokens (AWQ / MBQ statistic), compute dtype
    absmax: torch.Tensor  # [in] max |X| over all tokens (SmoothQuant statistic), compute dtype

    @property
    def n_tokens(self) -> int:
        return sum(c.x.shape[0] for c in self.chunks)

    def subsample(self, n: int) -> TokenChunk:
        """``n`` tokens evenly spaced over all tokens (all of them when there are fewer)."""
        total = self.n_tokens
        idx = torch.linspace(0, total - 1, steps=min(n, total)).round().long().unique()
        xs, vs, ans, start = [], [], [], 0
        for c in self.chunks:
            m = c.x.shape[0]
            sel = idx[(idx >= start) & (idx < start + m)] - start
            if sel.numel():
                sel = sel.to(c.x.device)
                xs.append(c.x[sel])
                vs.append(c.vision[sel])
                ans.append(c.answer[sel])
            start += m
        return TokenChunk(torch.cat(xs), torch.cat(vs), torch.cat(ans))


class _InputsBuilder:
    """Accumulates one Linear's inputs into fixed-size token chunks plus the |X| statistics."""

    def __init__(self, device: torch.device | str, chunk_tokens: int):
        self.device, self.chunk_tokens = device, chunk_tokens
        self.chunks: list[TokenChunk] = []
        self.buf: list[TokenChunk] = []
        self.buffered = 0
        self.abs_sum: torch.Tensor | None = None
        self.abs_max: torch.Tensor | None = None

    def add(self, x: torch.Tensor, smp: Sample) -> None:
        x = x.to(self.device)
        xa = x.to(compute_dtype(x.dtype)).abs()
        self.abs_sum = xa.sum(0) if self.abs_sum is None else self.abs_sum + xa.sum(0)
        self.abs_max = xa.amax(0) if self.abs_max is None else torch.maximum(self.abs_max, xa.amax(0))
        vis = smp.vision_mask.reshape(-1).to(device=self.device, dtype=torch.bool)
        ans = smp.answer_mask.reshape(-1).to(device=self.device, dtype=torch.bool)
        if vis.numel() != x.shape[0] or ans.numel() != x.shape[0]:
            raise ValueError(f"masks of length {vis.numel()}/{ans.numel()} for a sample of {x.shape[0]} tokens")
        self.buf.append(TokenChunk(x, vis, ans))
        self.buffered += x.shape[0]
        if self.buffered >= self.chunk_tokens:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        if not self.buf:
            return
        x = torch.cat([b.x for b in self.buf])
        v = torch.cat([b.vision for b in self.buf])
        a = torch.cat([b.answer for b in self.buf])
        n = self.chunk_tokens
        stop = x.shape[0] if final else (x.shape[0] // n) * n
        for s in range(0, stop, n):
            self.chunks.append(TokenChunk(x[s:s + n], v[s:s + n], a[s:s + n]))
        self.buf = [TokenChunk(x[stop:], v[stop:], a[stop:])] if stop < x.shape[0] else []
        self.buffered = x.shape[0] - stop

    def result(self) -> GroupInputs:
        self.flush(final=True)
        if not self.chunks:
            raise ValueError("no calibration tokens: the block received no samples")
        n = sum(c.x.shape[0] for c in self.chunks)
        return GroupInputs(self.chunks, self.abs_sum / n, self.abs_max)  # type: ignore[operator,arg-type]


@torch.no_grad()
def capture_groups_inputs(
    layer: nn.Module,
    samples: Iterable[Sample],
    linear_paths: Sequence[str],
    device: torch.device | str,
    chunk_tokens: int = 2048,
) -> dict[str, GroupInputs]:
    """Run the fp ``layer`` once over every sample and keep what each of ``linear_paths`` receives.

    One pass for all groups: the search's group inputs are the fp layer's, so they need not be
    recomputed per group (a layer forward per group was a third of a 7B block's search time on
    the H100). Peak memory is the layer plus every listed group's inputs, which is what the
    planner's search peak counts. The layer runs on its own device; the kept rows go to ``device``.
    """
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in linear_paths}
    builders = {p: _InputsBuilder(device, chunk_tokens) for p in linear_paths}

    def hook_for(path: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            seen[path].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [layer.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in linear_paths]
    try:
        for smp in samples:
            for v in seen.values():
                v.clear()
            replay(layer, smp)
            for path, got in seen.items():
                if len(got) != 1:
                    raise RuntimeError(f"{path} ran {len(got)} times in one layer forward; expected once")
                builders[path].add(got[0], smp)
    finally:
        for h in handles:
            h.remove()
    return {p: b.result() for p, b in builders.items()}


def capture_group_inputs(
    layer: nn.Module,
    samples: Iterable[Sample],
    linear_path: str,
    device: torch.device | str,
    chunk_tokens: int = 2048,
) -> GroupInputs:
    """What ``linear_path`` receives from the fp ``layer`` over every sample (one group's inputs:
    peak memory is the layer plus that group's inputs)."""
    return capture_groups_inputs(layer, samples, [linear_path], device, chunk_tokens)[linear_path]


# ------------------------------------------------------------------------------------ losses


def error_sum(delta: torch.Tensor, weights: torch.Tensor | None, norm: str) -> torch.Tensor:
    """``sum_t w_t sum_c f(delta_tc)`` with f = |.| ("mae") or square ("mse"), in float64."""
    d = delta.to(torch.float64) if delta.dtype == torch.float64 else delta.float()
    per_tok = d.abs().sum(-1) if norm == "mae" else d.square().sum(-1)
    if weights is not None:
        per_tok = per_tok * weights.to(per_tok.dtype)
    return per_tok.sum().to(torch.float64)


@dataclass(frozen=True)
class Weighting:
    """How calibration tokens weigh in a group's loss.

    ``vision_weight is None``: every token weighs 1 and the loss is a plain mean (AWQ).
    Otherwise answer tokens weigh 1, vision tokens ``vision_weight`` (MBQ's r), others 0, and the
    sum is divided by ``(N_ans + N_vis) * C`` (METHODS.md §4).
    """

    norm: str = "mse"  # "mse" | "mae"
    vision_weight: float | None = None

    def token_weights(self, chunk: TokenChunk) -> torch.Tensor | None:
        if self.vision_weight is None:
            return None
        dt = compute_dtype(chunk.x.dtype)
        return chunk.answer.to(dt) + self.vision_weight * chunk.vision.to(dt)

    def token_count(self, chunks: Sequence[TokenChunk]) -> int:
        if self.vision_weight is None:
            return sum(c.x.shape[0] for c in chunks)
        return sum(int(c.answer.sum()) + int(c.vision.sum()) for c in chunks)


# ----------------------------------------------------------------------------------- folding


def foldable(layer: nn.Module, group: LinearGroup) -> str | None:
    """None when scales can fold into ``group.prev_op``; else why not (e.g. GQA for o <- v)."""
    prev = layer.get_submodule(group.prev_op)
    ins = {layer.get_submodule(n).in_features for n in group.linears}
    if len(ins) != 1:
        return f"linears of {group.name} disagree on in_features {sorted(ins)}"
    c = ins.pop()
    if isinstance(prev, nn.Linear):
        if prev.out_features != c:
            return (f"{group.prev_op} out_features {prev.out_features} != {c} in_features of "
                    f"{group.linears[0]} (grouped-query attention): no exact fold")
        return None
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != (c,):
        return f"{group.prev_op} has no per-channel weight of size {c}"
    return None


@torch.no_grad()
def folded_tensors(
    layer: nn.Module, groups: Sequence[LinearGroup], scales: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every tensor of ``layer`` that folding ``scales`` ({group name: s [in]}) changes, in the
    compute dtype (float32, or float64 for a float64 layer), keyed by path relative to the layer.

    Prev-op outputs are divided by s (norm weight/bias; Linear rows/bias), the group's Linear
    columns multiplied by s. A Linear can be both (v_proj: a qkv column scale and the o group's
    row scale); both apply.
    """
    out: dict[str, torch.Tensor] = {}

    def current(path: str) -> torch.Tensor:
        if path not in out:
            t = layer.get_parameter(path).detach()
            out[path] = t.to(compute_dtype(t.dtype)).clone()
        return out[path]

    for g in groups:
        if g.name not in scales:
            continue
        prev = layer.get_submodule(g.prev_op)
        ref = current(f"{g.prev_op}.weight")
        sd = scales[g.name].to(device=ref.device, dtype=ref.dtype)
        if isinstance(prev, nn.Linear):
            out[f"{g.prev_op}.weight"] = current(f"{g.prev_op}.weight") / sd[:, None]
        else:
            out[f"{g.prev_op}.weight"] = current(f"{g.prev_op}.weight") / sd
        if getattr(prev, "bias", None) is not None:
            out[f"{g.prev_op}.bias"] = current(f"{g.prev_op}.bias") / sd
        for name in g.linears:
            w = current(f"{name}.weight")
            out[f"{name}.weight"] = w * sd.to(w.device)[None, :]
    return out


@torch.no_grad()
def load_tensors(layer: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``{relative parameter path: value}`` into ``layer`` (cast to each parameter's dtype)."""
    for path, value in tensors.items():
        p = layer.get_parameter(path)
        p.data.copy_(value.to(device=p.device, dtype=p.dtype))
    return layer


def group_linears(layer: nn.Module, group: LinearGroup) -> list[nn.Linear]:
    return [layer.get_submodule(n) for n in group.linears]  # type: ignore[misc]


def is_qk(path: str) -> bool:
    """q_proj / k_proj (and fused-name variants): Linears whose outputs only meet in q @ k^T."""
    leaf = path.rsplit(".", 1)[-1]
    return leaf in ("q_proj", "k_proj", "query", "key", "q", "k")
