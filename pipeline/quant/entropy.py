"""Q-VLM's entropy profile (METHODS.md §5): per-layer activation entropy and the conditional
entropy between consecutive layers, accumulated sample by sample during the capture pass.

Binning (the range must be known before a value is binned, and accumulators built on different
workers must share bins to be mergeable). Two grids:

- ``grid="token"`` (default): each token is binned on the grid of the per-token symmetric
  activation quantizer (METHODS.md §1): ``code = clamp(round(x / s_t), -2^(b-1), 2^(b-1)-1)`` with
  ``s_t = absmax_t / (2^(b-1)-1)``. With ``b = abits`` this is *exactly* the quantization bins of
  the quantized activations; for 16-bit activations ``b = 8`` gives 256 bins over each token's
  observed range ``[-absmax_t, absmax_t]``. The range comes with the token itself, so there is
  no warm-up, no second pass, and any split of the data over accumulators merges exactly.
- ``grid="fixed"``: ``2^b`` equal bins over a fixed per-layer ``value_range`` (values outside go
  to the edge bins). Use ``robust_range`` on the first sample(s) and give the *same* range to
  every worker; accumulators with different ranges refuse to merge.

Dependency (paper Eq. 4): ``D(k, k+1) = H(X_{k+1} | X_k)`` from the joint histogram of paired
values: the same (token, channel) element's bin at the input of layer k and at the input of layer
k+1 (the output of layer k). Same tokens by construction (a deterministic, evenly spaced token
subsample of one sample). The joint uses ``2^joint_bits`` bins per axis (codes coarsened by a bit
shift) so that 65k-cell tables are not estimated from a few hundred tokens. All entropies in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

GRIDS = ("token", "fixed")


# ------------------------------------------------------------------------------- pure math


def histogram_entropy(counts: torch.Tensor) -> float:
    """``-sum p log p`` (nats) of a histogram of counts; empty bins contribute 0; empty -> 0."""
    c = counts.double().flatten()
    n = c.sum()
    if n <= 0:
        return 0.0
    p = c[c > 0] / n
    return float(-(p * p.log()).sum())


def conditional_entropy(joint: torch.Tensor) -> float:
    """``H(Y | X) = -sum p(x, y) log p(y | x)`` (nats) of a joint count table ``[x, y]``."""
    j = joint.double()
    n = j.sum()
    if n <= 0:
        return 0.0
    px = j.sum(dim=1, keepdim=True).expand_as(j)
    nz = j > 0
    pxy = j[nz] / n
    return float(-(pxy * (j[nz] / px[nz]).log()).sum())


def subsample_tokens(n_tokens: int, max_tokens: int | None) -> torch.Tensor | None:
    """Evenly spaced token indices (deterministic, so paired layers see the same tokens); None = all."""
    if max_tokens is None or n_tokens <= max_tokens:
        return None
    return torch.linspace(0, n_tokens - 1, max_tokens).round().long()


def token_codes(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Bin index in ``[0, 2^bits)`` of each element of ``x [T, C]`` on its token's symmetric grid."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    # a 0-dim tensor divisor: true division on CUDA too, so the codes match fake_quantize_activations
    s = (xf.abs().amax(dim=-1, keepdim=True) / torch.tensor(float(qmax), device=xf.device)).clamp(min=1e-30)
    q = torch.round(xf / s).clamp(-qmax - 1, qmax)
    return (q + 2 ** (bits - 1)).long()


def range_codes(x: torch.Tensor, bits: int, value_range: tuple[float, float]) -> torch.Tensor:
    """Bin index in ``[0, 2^bits)`` of each element on ``2^bits`` equal bins over ``value_range``."""
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must have hi > lo, got {value_range}")
    n = 2**bits
    return torch.floor((x.float() - lo) / (hi - lo) * n).clamp(0, n - 1).long()


def robust_range(x: torch.Tensor, q: float = 0.999, max_values: int = 1 << 20) -> tuple[float, float]:
    """A symmetric-quantile range ``(quantile(1-q), quantile(q))`` of a sample, for ``grid="fixed"``.
    At most ``max_values`` evenly strided elements are used (torch.quantile has a size limit)."""
    v = x.detach().float().flatten()
    if v.numel() > max_values:
        v = v[:: math.ceil(v.numel() / max_values)]
    lo, hi = torch.quantile(v, torch.tensor([1 - q, q], device=v.device)).tolist()
    if hi <= lo:
        hi = lo + 1e-6
    return float(lo), float(hi)


# ------------------------------------------------------------------------------- accumulators


@dataclass
class EntropyAccumulator:
    """Counts for one layer: the marginal histogram of its input and the joint histogram of
    (its input, the next layer's input). Integer counts, so merging is exact addition."""

    bits: int = 8
    joint_bits: int = 6
    grid: str = "token"
    value_range: tuple[float, float] | None = None
    next_value_range: tuple[float, float] | None = None  # grid="fixed": the range of layer k+1
    max_tokens: int | None = 512
    hist: torch.Tensor = field(default=None)  # type: ignore[assignment]
    joint: torch.Tensor = field(default=None)  # type: ignore[assignment]
    tokens: int = 0  # tokens counted in ``hist``
    pair_tokens: int = 0  # tokens counted in ``joint``

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "fixed" and self.value_range is None:
            raise ValueError("grid='fixed' needs value_range (see robust_range)")
        self.joint_bits = min(self.joint_bits, self.bits)
        if self.value_range is not None:
            self.value_range = (float(self.value_range[0]), float(self.value_range[1]))
        if self.next_value_range is not None:
            self.next_value_range = (float(self.next_value_range[0]), float(self.next_value_range[1]))
        if self.hist is None:
            self.hist = torch.zeros(2**self.bits, dtype=torch.int64)
        if self.joint is None:
            self.joint = torch.zeros(2**self.joint_bits, 2**self.joint_bits, dtype=torch.int64)

    # -- feeding
    def codes(self, x: torch.Tensor, value_range: tuple[float, float] | None = None) -> torch.Tensor:
        """Marginal bin codes of ``x [T, C]`` (``value_range`` overrides the layer's, for layer k+1)."""
        if self.grid == "token":
            return token_codes(x, self.bits)
        return range_codes(x, self.bits, value_range or self.value_range)  # type: ignore[arg-type]

    def _sub(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"expected hidden states [T, C], got shape {tuple(x.shape)}")
        idx = subsample_tokens(x.shape[0], self.max_tokens)
        return x if idx is None else x[idx.to(x.device)]

    def update(self, x: torch.Tensor, x_next: torch.Tensor | None = None) -> None:
        """Count one sample: ``x`` is this layer's input ``[T, C]``, ``x_next`` (optional) the next
        layer's input for the same sample (this layer's output)."""
        xs = self._sub(x)
        c = self.codes(xs)
        self.hist += torch.bincount(c.flatten(), minlength=2**self.bits).cpu()
        self.tokens += xs.shape[0]
        if x_next is not None:
            self.update_pair(c, self.codes(self._sub(x_next), self.next_value_range or self.value_range))

    def update_pair(self, codes_k: torch.Tensor, codes_next: torch.Tensor) -> None:
        """Count paired marginal codes (same tokens, same channels) into the joint table."""
        if codes_k.shape != codes_next.shape:
            raise ValueError(f"paired codes differ in shape: {tuple(codes_k.shape)} vs {tuple(codes_next.shape)}")
        shift = self.bits - self.joint_bits
        n = 2**self.joint_bits
        idx = (codes_k >> shift) * n + (codes_next >> shift)
        self.joint += torch.bincount(idx.flatten(), minlength=n * n).reshape(n, n).cpu()
        self.pair_tokens += codes_k.shape[0]

    # -- results
    def entropy(self) -> float:
        return histogram_entropy(self.hist)

    def dependency(self) -> float:
        """``D(k, k+1)`` in nats; NaN when no pair was counted."""
        return conditional_entropy(self.joint) if self.pair_tokens else float("nan")

    # -- merging and serialization
    def _key(self) -> tuple:
        return (self.bits, self.joint_bits, self.grid, self.value_range, self.next_value_range)

    def merge(self, other: EntropyAccumulator) -> EntropyAccumulator:
        """A new accumulator holding both counts; refuses accumulators on different bins."""
        if self._key() != other._key():
            raise ValueError(f"cannot merge accumulators on different bins: {self._key()} vs {other._key()}")
        return EntropyAccumulator(
            self.bits, self.joint_bits, self.grid, self.value_range, self.next_value_range, self.max_tokens,
            self.hist + other.hist, self.joint + other.joint,
            self.tokens + other.tokens, self.pair_tokens + other.pair_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (plain ints and lists)."""
        return {
            "bits": self.bits, "joint_bits": self.joint_bits, "grid": self.grid,
            "value_range": list(self.value_range) if self.value_range else None,
            "next_value_range": list(self.next_value_range) if self.next_value_range else None,
            "max_tokens": self.max_tokens, "tokens": self.tokens, "pair_tokens": self.pair_tokens,
            "hist": self.hist.tolist(), "joint": self.joint.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EntropyAccumulator:
        vr = d.get("value_range")
        nvr = d.get("next_value_range")
        return cls(
            d["bits"], d["joint_bits"], d["grid"], tuple(vr) if vr else None, tuple(nvr) if nvr else None,
            d["max_tokens"], torch.tensor(d["hist"], dtype=torch.int64), torch.tensor(d["joint"], dtype=torch.int64),
            int(d["tokens"]), int(d["pair_tokens"]),
        )


class EntropyProfile:
    """One accumulator per decoder layer, fed from the capture pass's per-layer input hook.

    Call ``observe(i, hidden)`` for layers in increasing order within one sample (exactly the order
    the capture hook fires). A call for layer i right after one for layer i-1 of the same sample
    pairs them into ``D(i-1, i)``. A shard worker owning layers ``a..b`` should also call
    ``observe(b + 1, output_of_b, marginal=False)`` (b + 1 < L) so the pair across its boundary is counted,
    and ``end_sample()`` after each sample. Shards' profiles then ``merge`` (each layer's
    counts come from the one worker that saw them, or from several over disjoint samples).
    """

    def __init__(self, num_layers: int, bits: int = 8, joint_bits: int = 6, grid: str = "token",
                 value_ranges: list[tuple[float, float]] | None = None, max_tokens: int | None = 512):
        self.accs = [
            EntropyAccumulator(bits, joint_bits, grid,
                               value_ranges[i] if value_ranges else None,
                               value_ranges[i + 1] if value_ranges and i + 1 < num_layers else None,
                               max_tokens)
            for i in range(num_layers)
        ]
        self._pending: tuple[int, torch.Tensor] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.accs)

    def observe(self, i: int, hidden: torch.Tensor, marginal: bool = True) -> None:
        """Count layer ``i``'s input ``[T, C]`` (or ``[1, T, C]``); pair it with layer i-1 if that
        was the previous call. ``marginal=False``: pair only (the boundary call of a shard)."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} outside 0..{self.num_layers - 1}")
        if hidden.dim() == 3:
            hidden = hidden.reshape(-1, hidden.shape[-1])
        acc = self.accs[i]
        xs = acc._sub(hidden)
        codes = acc.codes(xs)
        if marginal:
            acc.hist += torch.bincount(codes.flatten(), minlength=2**acc.bits).cpu()
            acc.tokens += xs.shape[0]
        pending = self._pending
        if pending is not None and pending[0] == i - 1 and pending[1].shape == codes.shape:
            self.accs[i - 1].update_pair(pending[1], codes)
        self._pending = (i, codes)

    @classmethod
    def from_accumulators(cls, accs: list[EntropyAccumulator]) -> EntropyProfile:
        """A profile from per-layer accumulators (e.g. the wavefront's ``acc[i].update(h_in, h_out)``,
        merged over sample groups)."""
        out = cls.__new__(cls)
        out.accs = list(accs)
        out._pending = None
        return out

    def end_sample(self) -> None:
        self._pending = None

    def merge(self, other: EntropyProfile) -> EntropyProfile:
        if other.num_layers != self.num_layers:
            raise ValueError("profiles cover different numbers of layers")
        out = EntropyProfile.__new__(EntropyProfile)
        out.accs = [a.merge(b) for a, b in zip(self.accs, other.accs)]
        out._pending = None
        return out

    def entropies(self) -> list[float]:
        return [a.entropy() for a in self.accs]

    def dependencies(self) -> list[float]:
        """``[D(0,1), ..., D(L-2, L-1)]`` (NaN where no pair was counted)."""
        return [a.dependency() for a in self.accs[:-1]]

    def scores(self, mode: str) -> list[float]:
        """Per-layer partition scores: ``scores[i]`` decides whether layer i joins the block that
        ends at layer i-1. entropy: H of layer i's input; dependency: ``D(i-1, i)``, NaN for i=0."""
        if mode == "entropy":
            return self.entropies()
        if mode == "dependency":
            return [float("nan")] + self.dependencies()
        if mode == "fixed":
            return [0.0] * self.num_layers
        raise ValueError(f"mode must be entropy|dependency|fixed, got {mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [a.to_dict() for a in self.accs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EntropyProfile:
        out = cls.__new__(cls)
        out.accs = [EntropyAccumulator.from_dict(a) for a in d["layers"]]
        out._pending = None
        return out


# ------------------------------------------------------------------------------- differentiable


def soft_entropy(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Differentiable surrogate of the per-token-grid histogram entropy of ``x [T, C]`` (nats).

    Each value, normalized by its token's absmax to ``u in [-1, 1]``, is split between its two
    nearest of ``bins`` evenly spaced bin centres with weights ``1 - |u - centre| / width``
    (a triangular-kernel / linear-interpolation histogram). Counts are exact in total and the
    weights are piecewise linear in ``u``, so the gradient is defined everywhere but at centres.
    """
    xf = x.float()
    u = xf / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    pos = (u + 1) * 0.5 * (bins - 1)  # in [0, bins - 1]
    lo = pos.detach().floor().clamp(0, bins - 2)
    w_hi = pos - lo
    w_lo = 1 - w_hi
    lo = lo.long().flatten()
    counts = torch.zeros(bins, dtype=xf.dtype, device=xf.device)
    counts = counts.index_add(0, lo, w_lo.flatten()).index_add(0, lo + 1, w_hi.flatten())
    p = counts / counts.sum()
    return -(p * torch.log(p.clamp(min=1e-12))).sum()
