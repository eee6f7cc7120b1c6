"""Synthetic weights with real shapes (``--model synthetic:NAME``): scale tests without downloads.

Every tensor is a deterministic function of (model name, tensor name) generated where it is
needed — on a search worker's GPU, on the driver for the untouched tensors at gather — and never
written to disk except into the output checkpoint. The generator is an integer hash (murmur3
32-bit finalizer) evaluated with torch integer ops, so CPU and GPU produce *bit-identical* tensors:
a layer generated on a GPU for the search and the same layer generated on a CPU for validation
agree. Values are uniform with the variance of the usual init (std 1/sqrt(fan_in) for Linear
weights), norms are 1 plus a small perturbation.

Token ids (image token, chat markers) come from the family's local tiny tokenizer, so the
calibration pipeline runs on these models exactly as on real ones.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from ..errors import VlmqError, nearest
from .weights import WeightSource

MARKER = "synthetic.json"

# Real dimensions (config.json of the public checkpoints). Vision towers keep their real size;
# the image processors are set so one calibration image gives ~256 vision tokens.
SYNTHETIC_MODELS: dict[str, dict[str, Any]] = {
    # a small one with the 7B's vision geometry, so CI runs the synthetic path end to end
    "qwen2-vl-mini": dict(
        family="qwen2_vl",
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, rope_theta=1e6, mrope_section=[8, 12, 12]),
        vision=dict(depth=2, embed_dim=64, hidden_size=256, num_heads=2, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
    ),
    "qwen2-vl-7b": dict(
        family="qwen2_vl",
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
    ),
    "qwen2-vl-72b": dict(
        family="qwen2_vl",
        text=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=152064, rope_theta=1e6, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, hidden_size=8192, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
    ),
    "llava-onevision-72b": dict(
        family="llava_onevision",
        text=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=152128, rope_theta=1e6),
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                    num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                    vision_use_head=False),
    ),
    "internvl-26b": dict(
        family="internvl",
        # InternLM2-20B-shaped language model (Llama layout), InternViT-6B-shaped vision tower
        text=dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48,
                  num_key_value_heads=8, vocab_size=92553, rope_theta=1e6, model_type="llama"),
        vision=dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
                    image_size=448, patch_size=14, use_qk_norm=True, norm_type="rms_norm"),
    ),
}


def synthetic_names() -> list[str]:
    return sorted(SYNTHETIC_MODELS)


def _spec(name: str) -> dict[str, Any]:
    if name not in SYNTHETIC_MODELS:
        near = nearest(name, SYNTHETIC_MODELS)
        raise VlmqError(f"unknown synthetic model {name!r}",
                        f"use one of {', '.join(synthetic_names())}" + (f" (did you mean {near!r}?)" if near else ""))
    return SYNTHETIC_MODELS[name]


def synthetic_config(name: str) -> dict[str, Any]:
    """config.json of a synthetic model: the real dimensions on the family's tiny config skeleton."""
    from .tiny import build_tiny_tokenizer, tiny_config

    spec = _spec(name)
    family = spec["family"]
    tok = build_tiny_tokenizer(family)
    cfg = tiny_config(family, tok).to_dict()
    text = dict(spec["text"])
    msec = text.pop("mrope_section", None)
    for derived in ("layer_types", "head_dim", "max_window_layers"):  # recomputed from the new sizes
        cfg["text_config"].pop(derived, None)
    cfg["text_config"].update(text)
    if msec is not None:
        rp = dict(cfg["text_config"].get("rope_parameters") or {"rope_type": "default"})
        rp.update(rope_theta=text.get("rope_theta", 1e6), mrope_section=msec)
        cfg["text_config"]["rope_parameters"] = rp
    cfg["vision_config"].update(spec["vision"])
    if family == "internvl":
        cfg["image_seq_length"] = 256
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"
    return cfg


def materialize_synthetic(name: str, out_dir: str | Path) -> Path:
    """A model folder without weights: config.json, processor files and the marker."""
    from .processors import make_processor  # noqa: F401  (processors must import cleanly)
    from .tiny import build_processor

    spec = _spec(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(synthetic_config(name), indent=2))
    proc = build_processor(spec["family"])
    _realistic_image_size(proc, spec)
    proc.save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps({"name": name, "family": spec["family"]}))
    return out


def _realistic_image_size(proc: Any, spec: dict[str, Any]) -> None:
    """Make one calibration image cost about as many tokens as on the real model."""
    ip = proc.image_processor
    fam = spec["family"]

    def size(**kw: int) -> Any:  # transformers 5 keeps sizes in a SizeDict
        return type(ip.size)(**kw) if not isinstance(ip.size, dict) else dict(kw)

    if fam == "qwen2_vl":
        px = 448 * 448  # -> 32x32 patches -> 256 tokens after the 2x2 merge
        ip.size = size(shortest_edge=px, longest_edge=px)
    elif fam == "llava_onevision":
        side = spec["vision"]["image_size"]
        ip.size = size(height=side, width=side)
        ip.image_grid_pinpoints = [[side, side]]
        proc.num_image_tokens = (side // spec["vision"]["patch_size"]) ** 2
    elif fam == "internvl":
        side = spec["vision"]["image_size"]
        ip.size = size(height=side, width=side)
        proc.image_seq_length = 256


def is_synthetic_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# the generator


_GOLDEN32 = -1640531535  # 0x9E3779B1 as int32
_C1 = -2048144789  # 0x85EBCA6B as int32
_C2 = -1028477387  # 0xC2B2AE35 as int32


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def hash_uniform(n: int, seed: int, device: torch.device | str = "cpu", chunk: int = 1 << 24,
                 transform: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` floats uniform in [-1, 1): murmur3's 32-bit finalizer of (index * golden + seed),
    in wrapping int32 arithmetic — a pure function of (seed, index), identical on any device.

    ``transform`` (elementwise, fp32 -> fp32) and the cast to ``dtype`` are applied chunk by chunk,
    so a bf16 tensor never has an fp32 twin of its whole size (2.2 GB for a 7B embedding, 5 GB
    for a 72B one: it was the capture worker's peak)."""
    if n >= 2**31:
        raise ValueError(f"tensor of {n} elements is too large for the synthetic generator")
    seed32 = ((seed & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000  # as a signed int32
    out = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        h = torch.arange(start, start + m, dtype=torch.int32, device=device) * _GOLDEN32 + seed32
        h = h ^ _shr(h, 16)
        h = h * _C1
        h = h ^ _shr(h, 13)
        h = h * _C2
        h = h ^ _shr(h, 16)
        u = _shr(h, 8).to(torch.float32) * (2.0 / (1 << 24)) - 1.0
        out[start:start + m] = transform(u) if transform is not None else u
    return out


def tensor_seed(model: str, name: str) -> int:
    return (zlib.crc32(f"{model}/{name}".encode()) << 20) ^ zlib.crc32(name.encode())


def synthetic_tensor(model: str, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    n = math.prod(shape)
    if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
            or "layernorm" in name or name.endswith("ln.weight"):
        def transform(u: torch.Tensor) -> torch.Tensor:
            return 1.0 + 0.05 * u
    elif name.endswith(".bias"):
        def transform(u: torch.Tensor) -> torch.Tensor:
            return 0.02 * u
    elif len(shape) >= 2:
        bound = math.sqrt(3.0 / math.prod(shape[1:]))  # uniform with std 1/sqrt(fan_in)

        def transform(u: torch.Tensor) -> torch.Tensor:
            return u * bound
    else:
        def transform(u: torch.Tensor) -> torch.Tensor:
            return 0.02 * u
    return hash_uniform(n, tensor_seed(model, name), device, transform=transform, dtype=dtype).reshape(shape)


class SyntheticWeightSource(WeightSource):
    """Names, shapes and dtypes from the meta model; values from :func:`synthetic_tensor`."""

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu"):
        from . import detect_adapter
        from .loading import _inspect

        self.model_dir = Path(model_dir)
        meta = json.loads((self.model_dir / MARKER).read_text())
        self.name = meta["name"]
        self._config = json.loads((self.model_dir / "config.json").read_text())
        self.device = torch.device(device)
        model = _inspect(self._config, detect_adapter(self._config))  # cached per process
        self._entries = {k: (tuple(v.shape), torch.bfloat16 if v.is_floating_point() else v.dtype)
                         for k, v in model.state_dict().items()}
        # tied embeddings appear once in state_dict already; nothing else to do

    @property
    def config_dict(self) -> dict[str, Any]:
        return self._config

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        shape, dtype = self._entries[name]
        if not dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype)
        return synthetic_tensor(self.name, name, shape, dtype, self.device)
