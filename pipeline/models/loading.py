"""Building models from a ``WeightSource`` without materializing more than asked for.

Parameters are created on the meta device (free, whatever the model size); buffers are created
normally, because some (rotary ``inv_freq``, position ids) are computed in ``__init__`` and are
not in checkpoints. Tensors are then assigned one by one from the source.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from ..errors import VlmqError
from .base import VLMAdapter
from .weights import WeightSource

ATTN_IMPLEMENTATION = "sdpa"
CUDNN_SDPA_ENV = "VLMQ_CUDNN_SDPA"


def shape_stable_attention() -> bool:
    """Keep SDPA off cuDNN in this process (``VLMQ_CUDNN_SDPA=1`` leaves it on); True if turned off.

    cuDNN's attention builds an execution plan for every new sequence length, and calibration,
    the gradient pass, references and evaluation see a new length with nearly every sample. On the
    H100 (torch 2.11) that cost ~35 ms a call: 4.4 s for the first pass of a layer over 128
    samples, and every call of the MBQ gradient pass (14 ms forward + 14 ms backward per sample
    and layer, against ~1 ms of work). Flash / memory-efficient attention need no plan."""
    import os

    if os.environ.get(CUDNN_SDPA_ENV, "0") == "1":
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered, so the
    module's own init then runs on meta (no memory, no compute). Buffers stay real."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def config_from_dict(config_dict: dict[str, Any]) -> transformers.PretrainedConfig:
    """The transformers config object of a parsed config.json (no file access, no remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        from . import supported_architectures

        raise VlmqError(f"config.json has model_type {model_type!r}, unknown to transformers "
                        f"{transformers.__version__}", "use a model of a supported architecture: "
                        + "; ".join(supported_architectures()))
    return CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(config_dict))


def _meta(config_dict: dict[str, Any], model_class: str) -> nn.Module:
    config = config_from_dict(config_dict)
    with params_on_meta():
        model = getattr(transformers, model_class)._from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    return model.eval()


def build_meta_model(config_dict: dict[str, Any], adapter: VLMAdapter) -> nn.Module:
    """The whole model with every parameter on the meta device (shapes and names, no weights)."""
    return _meta(config_dict, adapter.model_class)


@functools.lru_cache(maxsize=4)
def _inspection_model(config_json: str, model_class: str) -> nn.Module:
    """A shared meta model for read-only questions (shapes, names); never loaded into."""
    return _meta(json.loads(config_json), model_class)


def _inspect(config_dict: dict[str, Any], adapter: VLMAdapter) -> nn.Module:
    return _inspection_model(json.dumps(config_dict, sort_keys=True, default=str), adapter.model_class)


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    if leaf in parent._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        parent._parameters[leaf] = tensor  # a Parameter is shared as is (tied weights)
    elif leaf in parent._buffers:
        parent._buffers[leaf] = tensor
    else:
        raise KeyError(name)


def _prepare(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def _buffers_to(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move the (real) buffers; parameters are still on meta and get assigned on ``device``."""
    if torch.device(device).type == "cpu":
        return module
    for mod in module.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(device)
    return module


def _tie_targets(model: nn.Module) -> dict[str, str]:
    """{tied parameter: its source} when the config ties embeddings, else {}."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    tie = bool(getattr(cfg, "tie_word_embeddings", False)) or bool(getattr(text, "tie_word_embeddings", False))
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if not tie or not isinstance(keys, dict):
        return {}
    return dict(keys)


def lm_head_tied(config_dict: dict[str, Any], adapter: VLMAdapter) -> bool:
    """True when the model's lm_head shares the token embeddings' tensor (from the meta model,
    so the class defaults count as transformers applies them)."""
    meta = _inspect(config_dict, adapter)
    return f"{adapter.lm_head_path}.weight" in _tie_targets(meta)


def untie_lm_head(source: WeightSource, adapter: VLMAdapter) -> WeightSource:
    """``source`` itself for an untied model; a tied one read as untied (``UntiedHeadSource``):
    what a job that packs the lm_head quantizes, references and writes."""
    if not lm_head_tied(source.config_dict, adapter):
        return source
    from .weights import UntiedHeadSource

    return UntiedHeadSource(source, f"{adapter.lm_head_path}.weight", f"{adapter.embed_path}.weight",
                            adapter.text_config_attr)


def _materialize(module: nn.Module, loaded: Iterable[tuple[str, torch.Tensor]], what: str) -> nn.Module:
    for name, t in loaded:
        try:
            _assign(module, name, t)
        except (KeyError, AttributeError):
            raise VlmqError(f"{what}: the checkpoint holds {name}, which the model does not have",
                            "check that config.json belongs to these weights") from None
    return module


def _missing(module: nn.Module) -> list[str]:
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    names += [n for n, b in module.named_buffers(remove_duplicate=False) if b.device.type == "meta"]
    return names


def build_model(
    source: WeightSource,
    adapter: VLMAdapter,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    skip_layers: bool = False,
) -> nn.Module:
    """The whole model from ``source`` (eval mode, sdpa attention, parameters frozen).

    ``dtype`` casts floating tensors (None keeps the checkpoint's); tied embeddings are tied when
    the config says so and the checkpoint omits the tied copy. ``skip_layers`` leaves the decoder
    layers on the meta device: the *head* a layer-streamed runner keeps resident.
    """
    model = _buffers_to(build_meta_model(source.config_dict, adapter), device)
    names = source.keys()
    if skip_layers:
        prefix = adapter.layers_path + "."
        names = [n for n in names if not n.startswith(prefix)]
    _materialize(model, ((n, _prepare(source.get(n), dtype, device)) for n in names), "build_model")
    have = set(names)
    for target, src in _tie_targets(model).items():
        if target not in have:
            _assign(model, target, model.get_parameter(src))
    missing = _missing(model)
    if skip_layers:
        missing = [n for n in missing if not n.startswith(adapter.layers_path + ".")]
    if missing:
        raise VlmqError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}",
                        "the weights are incomplete or belong to another config; re-copy the checkpoint")
    return model.eval()


def build_layers(
    source: WeightSource,
    adapter: VLMAdapter,
    layer_ids: Sequence[int],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> list[nn.Module]:
    """Decoder layers ``layer_ids`` alone, with only their tensors read from ``source``.

    The layers are copies of the layers of a (cached) meta model of the whole architecture, so
    they keep their real class, ``layer_idx`` and attention settings, and a worker that builds
    many blocks builds the meta model once. This is how a search task gets one block.
    """
    layers = _inspect(source.config_dict, adapter).get_submodule(adapter.layers_path)
    n = len(layers)
    out: list[nn.Module] = []
    keys = source.keys()
    for i in layer_ids:
        if not 0 <= i < n:
            raise VlmqError(f"layer {i} does not exist (the model has {n} decoder layers)",
                            f"use layer ids in 0..{n - 1}")
        layer = _buffers_to(copy.deepcopy(layers[i]), device)
        prefix = adapter.layer_prefix(i)
        mine = [k for k in keys if k.startswith(prefix)]
        _materialize(layer, ((k[len(prefix):], _prepare(source.get(k), dtype, device)) for k in mine),
                     f"layer {i}")
        missing = _missing(layer)
        if missing:
            raise VlmqError(f"the checkpoint lacks tensors of decoder layer {i}: {missing[:3]}",
                            "the weights are incomplete; re-copy the checkpoint")
        out.append(layer.eval())
    return out


def layer_linear_names(adapter: VLMAdapter, config: dict[str, Any] | None = None) -> list[str]:
    """Paths (relative to a decoder layer) of the Linears the adapter's groups quantize, in group
    order. ``config`` is accepted for families whose layers differ by config; none do yet."""
    return [name for g in adapter.linear_groups for name in g.linears]


def check_group_size(config_dict: dict[str, Any], adapter: VLMAdapter, group_size: int | None,
                     lm_head: bool = False, lm_head_group_size: int | None | str = "same") -> None:
    """Raise ``VlmqError`` naming the first quantized Linear whose in_features ``group_size`` does
    not divide (from the meta model: no weights read). ``group_size`` None or <= 0 means per-channel.
    ``lm_head``: the recipe packs the lm_head too, so it is checked as well, with
    ``lm_head_group_size`` when the head has its own (``--lm-head-group-size``; "same": the layers')."""
    head_gs = group_size if lm_head_group_size == "same" else lm_head_group_size
    checks: list[tuple[int | None, str]] = [(group_size, "--group-size")]
    if lm_head:
        checks.append((head_gs, "--group-size" if lm_head_group_size == "same" else "--lm-head-group-size"))
    if all(g is None or g <= 0 for g, _ in checks):
        return
    meta = _inspect(config_dict, adapter)
    layers = meta.get_submodule(adapter.layers_path)
    names = layer_linear_names(adapter, config_dict)
    linears = [(f"{adapter.layers_path}.{i}.{rel}", layer.get_submodule(rel), group_size, "--group-size")
               for i, layer in enumerate(layers) for rel in names]
    if lm_head:
        linears.append((adapter.lm_head_path, meta.get_submodule(adapter.lm_head_path), *checks[1]))
    for name, lin, gs, flag in linears:
        if gs is not None and gs > 0 and lin.in_features % gs:
            divisors = [g for g in (32, 64, 128) if lin.in_features % g == 0]
            fix = (f"use a group size that divides {lin.in_features}: one of {divisors}, or per-channel"
                   if divisors else "use per-channel quantization (no group size)")
            if flag == "--lm-head-group-size":
                fix = f"pass {flag} with a value that divides the hidden size {lin.in_features}: " + (
                    f"one of {divisors}, or 'channel'" if divisors else "'channel'")
            raise VlmqError(f"group size {gs} ({flag}) does not divide in_features={lin.in_features} of {name}", fix)


@dataclass
class MemoryEstimate:
    """Bytes of the weights at one dtype, by part (for ``vlmq plan`` and the shard planner)."""

    dtype: torch.dtype
    layer_bytes: list[int]  # per decoder layer, in order
    other_bytes: dict[str, int] = field(default_factory=dict)  # vision_tower, projector, embeddings,
    # final_norm, lm_head (0 when tied to the embeddings), other

    @property
    def vision_bytes(self) -> int:
        return self.other_bytes.get("vision_tower", 0) + self.other_bytes.get("projector", 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + sum(self.other_bytes.values())


def estimate_memory(config_dict: dict[str, Any], adapter: VLMAdapter, dtype: torch.dtype) -> MemoryEstimate:
    """Weight bytes per decoder layer and per other part, from config.json alone (meta model).

    Parameters only, floating ones at ``dtype`` (buffers such as rotary tables are a few KB and
    are rebuilt, not loaded). Tied parameters count once: ``lm_head`` is 0 when tied.
    """
    meta = _inspect(config_dict, adapter)
    fsize = torch.empty((), dtype=dtype).element_size()
    n_layers = len(meta.get_submodule(adapter.layers_path))
    layers = [0] * n_layers
    other = {"vision_tower": 0, "projector": 0, "embeddings": 0, "final_norm": 0, "lm_head": 0, "other": 0}
    for name, t in meta.named_parameters():  # deduplicates tied parameters
        nbytes = t.numel() * (fsize if t.is_floating_point() else t.element_size())
        i = adapter.layer_index(name)
        if i is not None:
            layers[i] += nbytes
        elif adapter.projector_path and name.startswith(adapter.projector_path + "."):
            other["projector"] += nbytes
        elif adapter.is_vision(name):
            other["vision_tower"] += nbytes
        elif name.startswith(adapter.embed_path + "."):
            other["embeddings"] += nbytes
        elif name.startswith(adapter.final_norm_path + "."):
            other["final_norm"] += nbytes
        elif name.startswith(adapter.lm_head_path + "."):
            other["lm_head"] += nbytes
        else:
            other["other"] += nbytes
    return MemoryEstimate(dtype=dtype, layer_bytes=layers, other_bytes=other)
