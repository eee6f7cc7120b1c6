"""Model adapters: one declarative ``VLMAdapter`` per VLM family, and finding the family of a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import VlmqError, nearest
from .base import LLAMA_LIKE_GROUPS, VLMAdapter
from .families import ALL_ADAPTERS
from .layer_io import clean_layer_kwargs

ADAPTERS: dict[str, VLMAdapter] = {a.family: a for a in ALL_ADAPTERS}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(ADAPTERS)

# Families people will try that we do not support, with the advice that fits them.
_HINTS = {
    "internvl_chat": "this is the remote-code InternVL layout; use the transformers-native '-hf' "
    "checkpoint (e.g. OpenGVLab/InternVL3-1B-hf, model_type 'internvl')",
    "llava_next": "LLaVA-NeXT (1.6) is not supported yet; LLaVA-1.5 ('llava') and LLaVA-OneVision are",
}


def supported_architectures() -> list[str]:
    return [f"{a.model_class} (model_type '{a.model_types[0]}')" for a in ALL_ADAPTERS]


def _read_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise VlmqError(f"no config.json at {p}", "pass a model folder that holds config.json")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmqError(f"{p} is not valid JSON ({e})", "restore config.json from the original checkpoint") from None


def detect_adapter(config: dict[str, Any] | str | Path) -> VLMAdapter:
    """The adapter for a model, from config.json's ``model_type`` (or ``architectures``).

    Raises ``VlmqError`` listing the supported architectures for anything else.
    """
    cfg = _read_config(config)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for a in ALL_ADAPTERS:
        if model_type in a.model_types:
            return a
    for a in ALL_ADAPTERS:
        if a.model_class in archs:
            return a
    what = f"model_type {model_type!r}" + (f", architectures {archs}" if archs else "")
    hint = _HINTS.get(str(model_type))
    near = nearest(str(model_type), [t for a in ALL_ADAPTERS for t in a.model_types])
    fix = "use a model of a supported architecture: " + "; ".join(supported_architectures())
    if hint:
        fix = f"{hint}. Supported: " + "; ".join(supported_architectures())
    elif near:
        fix += f" (did you mean {near!r}?)"
    raise VlmqError(f"unsupported architecture: {what}", fix)


__all__ = [
    "ADAPTERS",
    "LLAMA_LIKE_GROUPS",
    "SUPPORTED_FAMILIES",
    "VLMAdapter",
    "clean_layer_kwargs",
    "detect_adapter",
    "supported_architectures",
]
