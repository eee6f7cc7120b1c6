"""Read a vlmq / compressed-tensors ``pack-quantized`` checkpoint back.

- :func:`iter_quantized` streams ``(module, QuantizedWeight, bias)`` one Linear at a time.
- :func:`load_quantized_model` rebuilds the transformers model: parameters are created on the
  meta device (``models.loading.build_meta_model``; buffers such as rotary ``inv_freq`` are
  computed for real at construction), then every tensor is loaded from the shards. ``backend="fake"`` puts dequantized weights into
  plain Linears (the reference path every kernel is checked against); ``backend="triton"``
  swaps each quantized Linear for ``kernels.QuantLinear``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..errors import VlmqError
from ..quant.quantizer import QuantizedWeight, fake_quantize_activations
from .layout import SUFFIXES, act_bits_of, decompress_weight, resolve_schemes

INDEX_NAME = "model.safetensors.index.json"
BACKENDS = ("fake", "triton")


# ----------------------------------------------------------------------------- reading files


def read_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise VlmqError(f"{ckpt_dir} has no config.json", "point at a checkpoint directory written by vlmq")
    return json.loads(path.read_text())


def weight_map(ckpt_dir: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (or the single ``model.safetensors``)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single.name for k in f.keys()}
    raise VlmqError(f"{ckpt_dir} has no {INDEX_NAME} nor model.safetensors", "re-run the quantize job")


class _Shards:
    """Lazily opened safetensors handles of one checkpoint."""

    def __init__(self, ckpt_dir: Path, wmap: dict[str, str]):
        self.dir, self.wmap = ckpt_dir, wmap
        self._open: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def get(self, name: str) -> torch.Tensor:
        shard = self.wmap[name]
        if shard not in self._open:
            self._open[shard] = self._stack.enter_context(safe_open(str(self.dir / shard), framework="pt"))
        return self._open[shard].get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


def quantized_modules(wmap: dict[str, str]) -> list[str]:
    """Modules that hold a ``weight_packed``, in shard order (so streaming touches each shard once)."""
    mods = [k[: -len(".weight_packed")] for k in wmap if k.endswith(".weight_packed")]
    return sorted(mods, key=lambda m: (wmap[f"{m}.weight_packed"], m))


def iter_quantized(
    ckpt_dir: str | os.PathLike,
) -> Iterator[tuple[str, QuantizedWeight, torch.Tensor | None]]:
    """Every quantized Linear: (module name, QuantizedWeight in the internal convention, bias or None)."""
    ckpt_dir = Path(ckpt_dir)
    qconfig = read_config(ckpt_dir).get("quantization_config")
    if not qconfig:
        raise VlmqError(f"{ckpt_dir}/config.json has no quantization_config", "this is not a quantized checkpoint")
    wmap = weight_map(ckpt_dir)
    modules = quantized_modules(wmap)
    schemes = resolve_schemes(qconfig, modules)
    shards = _Shards(ckpt_dir, wmap)
    try:
        for m in modules:
            tensors = {s: shards.get(f"{m}.{s}") for s in SUFFIXES if f"{m}.{s}" in wmap}
            bias = shards.get(f"{m}.bias") if f"{m}.bias" in wmap else None
            yield m, decompress_weight(tensors, schemes[m]), bias
    finally:
        shards.close()


# ----------------------------------------------------------------------------- building models


def config_dtype(config_dict: dict[str, Any]) -> torch.dtype:
    name = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def empty_model(config_dict: dict[str, Any]) -> nn.Module:
    """The model with parameters on meta and real buffers: nothing of the weights is allocated."""
    from ..models import detect_adapter
    from ..models.loading import build_meta_model

    plain = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    return build_meta_model(plain, detect_adapter(plain))


def linear_module_names(config_dict: dict[str, Any]) -> list[str]:
    """Full names of every ``nn.Linear`` of the model (built on meta; cheap at any size)."""
    model = empty_model(config_dict)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def _swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _act_fake_quant(bits: int) -> Any:
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (fake_quantize_activations(args[0], bits), *args[1:])

    return hook


def _quant_linear_class() -> Any:
    try:
        from kernels import QuantLinear  # type: ignore[attr-defined]
    except ImportError as e:
        raise VlmqError(
            f"the triton backend needs kernels.QuantLinear, which is unavailable ({e})",
            "use backend='fake', or install vlmq with its kernels package and triton",
        ) from e
    return QuantLinear


def load_quantized_model(
    ckpt_dir: str | os.PathLike,
    backend: str = "fake",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild the transformers model of a checkpoint, in eval mode, on ``device``.

    ``fake``: dequantized weights (exact ``(q - zero) * scale`` cast to ``dtype``) in plain Linears;
    when the config quantizes input activations (W4A8), each such Linear fake-quantizes its input
    per token first (``quant.quantizer.fake_quantize_activations``).
    ``triton``: ``kernels.QuantLinear.from_quantized(qweight, bias, act_bits)`` in their place; on a
    GPU the kernel autotuner starts from the launches earlier runs chose (``pipeline.kernel_choices``).
    """
    if backend not in BACKENDS:
        raise VlmqError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    ckpt_dir = Path(ckpt_dir)
    config_dict = read_config(ckpt_dir)
    qconfig = config_dict.get("quantization_config") or {}
    act_bits = act_bits_of(qconfig) if qconfig else 16
    quant_linear = _quant_linear_class() if backend == "triton" else None
    dtype = dtype or config_dtype(config_dict)
    device = torch.device(device)
    model = empty_model(config_dict)

    wmap = weight_map(ckpt_dir)
    consumed: set[str] = set()
    for name, qw, bias in iter_quantized(ckpt_dir) if qconfig else ():
        consumed.update(f"{name}.{s}" for s in SUFFIXES)
        consumed.add(f"{name}.bias")
        bias = None if bias is None else bias.to(device=device, dtype=dtype)
        if quant_linear is None:
            _set_tensor(model, f"{name}.weight", qw.dequantize(dtype).to(device))
            if bias is not None:
                _set_tensor(model, f"{name}.bias", bias)
            if act_bits < 16:  # W4A8: dynamic per-token activations, as the checkpoint's config says
                model.get_submodule(name).register_forward_pre_hook(_act_fake_quant(act_bits))
        else:
            qw = QuantizedWeight(
                qweight=qw.qweight.to(device),
                scale=qw.scale.to(device),
                zero=None if qw.zero is None else qw.zero.to(device),
                scheme=qw.scheme,
            )
            _swap_module(model, name, quant_linear.from_quantized(qw, bias, act_bits))

    shards = _Shards(ckpt_dir, wmap)
    unexpected = []
    try:
        for name in sorted(wmap, key=lambda k: (wmap[k], k)):
            if name in consumed:
                continue
            t = shards.get(name)
            if t.is_floating_point():
                t = t.to(dtype)
            try:
                _set_tensor(model, name, t.to(device))
            except (KeyError, AttributeError):
                unexpected.append(name)
    finally:
        shards.close()
    if unexpected:
        raise VlmqError(f"checkpoint tensors the model does not have: {unexpected[:5]}", "the config does not match the tensors")

    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise VlmqError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}", "re-run the quantize job")
    if quant_linear is not None and device.type == "cuda":  # the autotuner's launches from earlier runs
        from ..kernel_choices import enable

        enable(device)
    return model.to(device).eval()
