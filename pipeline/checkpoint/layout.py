"""The compressed-tensors ``pack-quantized`` layout (METHODS.md §6), as pure functions.

One quantized Linear ``<module>`` is stored as ``<module>.weight_packed`` (int32
``[out, ceil(in*b/32)]``), ``<module>.weight_scale`` (``[out, n_groups]``, model dtype),
``<module>.weight_shape`` (int64 ``[2]``) and, when asymmetric, ``<module>.weight_zero_point``
(int32 packed along ``out``: ``[ceil(out*b/32), n_groups]``). ``config.json`` carries the
matching ``quantization_config``. Shared by the part files, the writer, the loader and validate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..quant.quantizer import QuantizedWeight, QuantScheme
from .packing import (
    from_stored,
    pack_int32,
    pack_zero_points,
    packed_len,
    to_stored,
    unpack_int32,
    unpack_zero_points,
)

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}  # fmt: skip


def st_dtype(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype string (``get_slice(...).get_dtype()``)."""
    if name not in _ST_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return _ST_DTYPES[name]


def compress_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One quantized Linear -> its on-disk tensors, keyed by suffix (``weight_packed``, ...)."""
    s = qw.scheme
    out_f, in_f = qw.shape
    n_groups = s.n_groups(in_f)
    if tuple(qw.scale.shape) != (out_f, n_groups):
        raise ValueError(f"scale shape {tuple(qw.scale.shape)} != {(out_f, n_groups)}")
    tensors = {
        "weight_packed": pack_int32(to_stored(qw.qweight, s), s.bits),
        "weight_scale": qw.scale.contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not s.symmetric:
        if qw.zero is None:
            raise ValueError("an asymmetric QuantizedWeight needs zero points")
        tensors["weight_zero_point"] = pack_zero_points(qw.zero.to(torch.int16), s.bits)
    return tensors


def decompress_weight(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme) -> QuantizedWeight:
    """Inverse of :func:`compress_weight`."""
    out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
    q = from_stored(unpack_int32(tensors["weight_packed"], scheme.bits, in_f), scheme)
    zero = None
    if not scheme.symmetric:
        zero = unpack_zero_points(tensors["weight_zero_point"], scheme.bits, out_f)
    return QuantizedWeight(qweight=q, scale=tensors["weight_scale"], zero=zero, scheme=scheme)


def expected_layout(
    out_f: int, in_f: int, scheme: QuantScheme
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Shape and dtype of every on-disk tensor of one Linear (scale dtype: None = any 16/32-bit float)."""
    n_groups = scheme.n_groups(in_f)
    spec: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        "weight_packed": ((out_f, packed_len(in_f, scheme.bits)), torch.int32),
        "weight_scale": ((out_f, n_groups), None),
        "weight_shape": ((2,), torch.int64),
    }
    if not scheme.symmetric:
        spec["weight_zero_point"] = ((packed_len(out_f, scheme.bits), n_groups), torch.int32)
    return spec


def weights_args(scheme: QuantScheme) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` of a weight scheme, as JSON."""
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if scheme.group_size is None else "group",
        "group_size": scheme.group_size,
        "dynamic": False,
        "observer": "minmax",
        "actorder": None,
    }


def activation_args(act_bits: int | None) -> dict[str, Any] | None:
    """Dynamic per-token symmetric int activations (W4A8), or None for 16-bit activations."""
    if act_bits is None or act_bits >= 16:
        return None
    if act_bits != 8:
        raise ValueError(f"only 8-bit activations are supported, got {act_bits}")
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None, "dynamic": True}


def scheme_from_args(args: Mapping[str, Any]) -> QuantScheme:
    """Parse a ``weights`` entry of a config group back into a QuantScheme."""
    if args.get("type", "int") != "int":
        raise ValueError(f"only int weights are supported, got type {args.get('type')!r}")
    strategy = args.get("strategy")
    if strategy not in ("group", "channel"):
        raise ValueError(f"unsupported weight strategy {strategy!r} (expected 'group' or 'channel')")
    gs = args.get("group_size") if strategy == "group" else None
    return QuantScheme(bits=int(args["num_bits"]), group_size=gs, symmetric=bool(args.get("symmetric", True)))


def quantization_config(
    schemes: Mapping[str, QuantScheme], ignore: Iterable[str], act_bits: int | None = None
) -> dict[str, Any]:
    """``config.json["quantization_config"]`` for modules quantized with ``schemes``.

    One scheme (the usual case): a single group targeting every ``Linear`` not in ``ignore``.
    Several (mixed precision): one group per scheme, targeting its modules by exact name.
    """
    by_scheme: dict[QuantScheme, list[str]] = {}
    for name, s in schemes.items():
        by_scheme.setdefault(s, []).append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: (-len(kv[1]), kv[0].bits, kv[0].group_size or 0))
    groups = {}
    for i, (s, names) in enumerate(ordered):
        targets = ["Linear"] if len(ordered) == 1 else sorted(names)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights_args(s),
            "input_activations": activation_args(act_bits),
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def is_ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(_matches(name, t) for t in ignore)


def resolve_schemes(qconfig: Mapping[str, Any], packed_modules: Iterable[str]) -> dict[str, QuantScheme]:
    """Which scheme each module holding a ``weight_packed`` uses, from the config groups.

    A module matched by no group, or listed in ``ignore``, raises: the checkpoint contradicts its config.
    """
    if qconfig.get("format") != "pack-quantized" or qconfig.get("quant_method") != "compressed-tensors":
        raise ValueError(
            f"not a compressed-tensors pack-quantized config: quant_method={qconfig.get('quant_method')!r} "
            f"format={qconfig.get('format')!r}"
        )
    ignore = qconfig.get("ignore") or []
    groups = [(g["targets"], scheme_from_args(g["weights"])) for g in qconfig["config_groups"].values()]
    out: dict[str, QuantScheme] = {}
    for name in packed_modules:
        if is_ignored(name, ignore):
            raise ValueError(f"{name} is listed in ignore but holds quantized tensors")
        hit = next((s for targets, s in groups if any(t == "Linear" or _matches(name, t) for t in targets)), None)
        if hit is None:
            raise ValueError(f"{name} holds quantized tensors but no config group targets it")
        out[name] = hit
    return out


def act_bits_of(qconfig: Mapping[str, Any]) -> int:
    """Activation bits the checkpoint asks for (16 when activations stay floating point)."""
    for g in qconfig.get("config_groups", {}).values():
        ia = g.get("input_activations")
        if ia:
            return int(ia["num_bits"])
    return 16
