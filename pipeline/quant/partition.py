"""Q-VLM's block partition of the decoder (METHODS.md §5) and its report figure.

``scores[i]`` is the score of attaching layer i to the block that ends at layer i-1 (entropy mode:
the entropy of layer i's input; dependency mode: ``D(i-1, i)``, NaN for layer 0). See
``EntropyProfile.scores``. Layer 0 always opens a block; a NaN score always opens a new block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

MODES = ("entropy", "dependency", "fixed")


def quantile_threshold(scores: Sequence[float], p: float) -> float:
    """tau: the p-quantile of the finite scores, linear interpolation between order statistics
    (numpy/torch default: position ``p * (n - 1)`` in the sorted list)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    vals = [float(s) for s in scores if s is not None and math.isfinite(s)]
    if not vals:
        return float("inf")
    return float(torch.quantile(torch.tensor(vals, dtype=torch.float64), p))


def partition(
    scores: Sequence[float], p: float = 0.5, max_block_layers: int = 3, mode: str = "entropy"
) -> list[list[int]]:
    """Blocks of consecutive layer indices covering ``range(len(scores))``.

    entropy / dependency: greedy over the layers; layer i joins the current block while
    ``scores[i] >= tau`` (tau = p-quantile of the scores) and the block has fewer than
    ``max_block_layers`` layers, else it starts a new block. fixed: blocks of ``max_block_layers``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_block_layers < 1:
        raise ValueError(f"max_block_layers must be >= 1, got {max_block_layers}")
    n = len(scores)
    if n == 0:
        return []
    if mode == "fixed":
        return [list(range(s, min(s + max_block_layers, n))) for s in range(0, n, max_block_layers)]
    tau = quantile_threshold(scores, p)
    blocks = [[0]]
    for i in range(1, n):
        s = scores[i]
        if s is not None and math.isfinite(s) and s >= tau and len(blocks[-1]) < max_block_layers:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


def plot_partition(
    scores: Sequence[float], blocks: Sequence[Sequence[int]], tau: float | None = None,
    title: str = "Q-VLM partition", ylabel: str = "score (nats)",
) -> Any:
    """A matplotlib Figure: the score per layer, tau, and the block boundaries (shaded blocks).
    Uses ``matplotlib.figure.Figure`` directly (no pyplot state); saving is the caller's job."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.25 * len(scores) + 2), 3.2), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(scores)))
    ys = [float("nan") if s is None else float(s) for s in scores]
    for b, blk in enumerate(blocks):
        ax.axvspan(blk[0] - 0.5, blk[-1] + 0.5, color="C0" if b % 2 == 0 else "C1", alpha=0.12, lw=0)
        if b:
            ax.axvline(blk[0] - 0.5, color="k", lw=0.8)
    ax.plot(xs, ys, "o-", color="C3", ms=3, lw=1, label="score")
    if tau is not None and math.isfinite(tau):
        ax.axhline(tau, color="C2", ls="--", lw=1, label=f"tau = {tau:.3g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}: {len(blocks)} blocks over {len(scores)} layers")
    ax.set_xlim(-0.5, len(scores) - 0.5)
    ax.legend(loc="best", fontsize=8)
    return fig
