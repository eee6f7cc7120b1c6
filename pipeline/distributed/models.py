"""Turning the user's ``--model`` into something every worker can open by itself."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import VlmqError
from ..models.weights import WeightSource

TINY_FALLBACK_FAMILY = "llava"


def resolve_model(model: str, work_dir: Path) -> str:
    """``builtin`` -> the shipped trained model (``builtin-outlier``: its exactly rescaled variant
    with planted outlier channels) (or, until it exists, a tiny random LLaVA
    generated deterministically into the cache); ``synthetic:NAME`` -> a weightless model
    folder in the cache; paths are made absolute."""
    if model.startswith("synthetic:"):
        from ..models.synthetic import materialize_synthetic

        name = model.split(":", 1)[1]
        return str(_atomic_dir(cache_dir() / f"synthetic-{name}", lambda d: materialize_synthetic(name, d)))
    if model == "builtin-outlier":
        from ..models.builtin import builtin_outlier_dir

        return str(Path(builtin_outlier_dir()).resolve())
    if model == "builtin":
        from ..models.builtin import BUILTIN_DIR, builtin_available

        if builtin_available():
            return str(Path(BUILTIN_DIR).resolve())
        return str(tiny_builtin(work_dir))
    p = Path(model).expanduser()
    if not p.exists():
        raise VlmqError(f"model path {p} does not exist",
                        "pass a folder with config.json and *.safetensors, or --model builtin")
    return str(p.resolve())


def cache_dir() -> Path:
    """Where generated models live (deterministic, so shared by jobs): $VLMQ_CACHE or ~/.cache/vlmq."""
    return Path(os.environ.get("VLMQ_CACHE") or Path.home() / ".cache" / "vlmq")


def tiny_builtin(work_dir: Path) -> Path:
    from ..models.tiny import save_tiny

    return _atomic_dir(cache_dir() / "tiny-llava", lambda d: save_tiny(TINY_FALLBACK_FAMILY, d, seed=0))


def _atomic_dir(out: Path, build) -> Path:
    """Build a generated folder once, atomically (concurrent jobs may race for it)."""
    import shutil

    if not (out / "config.json").exists():
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        build(tmp)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(out)
        except OSError:  # another job won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return out.resolve()


def open_model_source(ref: str, allow_pickle: bool = False, device: str | None = None) -> WeightSource:
    """Open a resolved model reference. Synthetic models generate tensors on ``device``
    (default: this worker's GPU, else CPU) — identical values on any device."""
    from ..models.synthetic import SyntheticWeightSource, is_synthetic_dir

    if is_synthetic_dir(ref):
        from .context import worker_device

        return SyntheticWeightSource(ref, device=device or worker_device())
    from ..models.weights import open_source

    return open_source(ref, allow_pickle=allow_pickle)


def job_source(ctx, device: str | None = None, head: bool = False) -> WeightSource:
    """The job's model as every worker sees it: with Q-VLM's visual-encoder optimization, the
    tuned projector tensors overlay the source's (``ctx.options["overlay"]``, a safetensors file).

    ``head``: the view of the stages that see the lm_head as the checkpoint will hold it (its
    quantization, the reference pass): with ``recipe.quantize_lm_head`` a model with tied
    embeddings reads as untied (``models.loading.untie_lm_head``)."""
    base = open_model_source(ctx.model, ctx.allow_pickle, device)
    if head and ctx.recipe.quantize_lm_head:
        from ..models import ADAPTERS
        from ..models.loading import untie_lm_head

        base = untie_lm_head(base, ADAPTERS[ctx.family])
    overlay = ctx.options.get("overlay")
    if not overlay:
        return base
    from safetensors.torch import load_file

    from ..evaluate.streamed import OverlaySource

    return OverlaySource(base, {}, load_file(overlay))
