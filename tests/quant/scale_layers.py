"""Test fixtures for the scale searches: real transformers decoder layers with random weights,
calibration samples with planted outlier channels, and settings. Not a test module."""

from __future__ import annotations

import torch
import transformers

from pipeline.models.base import LLAMA_LIKE_GROUPS
from pipeline.quant.quantizer import QuantScheme
from pipeline.quant.types import BlockCalib, Sample, SearchSettings


def text_config(arch: str, hidden: int = 128, inter: int = 256, heads: int = 4, kv_heads: int = 4):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    cfg = cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
              num_key_value_heads=kv_heads, vocab_size=64, max_position_embeddings=512, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    return cfg


def decoder_layer(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, outliers: int = 0,
                  **kw) -> tuple[torch.nn.Module, object]:
    """A decoder layer with random weights, random norm weights and (Qwen2) random q/k/v biases.

    ``outliers`` input channels of the attention and MLP inputs get large norm weights, and as
    many v_proj/up_proj rows are scaled up, so every group sees outlier channels."""
    cfg = text_config(arch, **kw)
    mod = transformers.models.llama.modeling_llama if arch == "llama" else transformers.models.qwen2.modeling_qwen2
    cls = mod.LlamaDecoderLayer if arch == "llama" else mod.Qwen2DecoderLayer
    g = torch.Generator().manual_seed(seed)
    layer = cls(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        if outliers:
            idx = torch.randperm(cfg.hidden_size, generator=g)[:outliers]
            layer.input_layernorm.weight[idx] *= 20
            layer.post_attention_layernorm.weight[idx] *= 20
            v = layer.self_attn.v_proj.weight
            layer.self_attn.v_proj.weight[torch.randperm(v.shape[0], generator=g)[:outliers]] *= 10
            u = layer.mlp.up_proj.weight
            layer.mlp.up_proj.weight[torch.randperm(u.shape[0], generator=g)[:outliers]] *= 10
    return layer.to(dtype).eval(), cfg


def rotary(cfg, n_tokens: int, dtype: torch.dtype) -> dict:
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    pos = torch.arange(n_tokens)[None]
    cos, sin = rope(torch.zeros(1, n_tokens, cfg.hidden_size), pos)
    return {"position_embeddings": (cos.to(dtype), sin.to(dtype)), "position_ids": pos, "attention_mask": None}


def samples(cfg, n: int = 3, tokens: int = 48, seed: int = 1, dtype: torch.dtype = torch.float32,
            vision_frac: float = 0.5, answer_frac: float = 0.25, all_weighted: bool = False) -> list[Sample]:
    """Random hidden states (a few big channels, as real residual streams have), vision tokens
    first, then text, the answer at the end; ``all_weighted``: every token is vision or answer."""
    big = torch.randperm(cfg.hidden_size, generator=torch.Generator().manual_seed(0))[:4]  # same in every set
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = tokens + 4 * i
        h = torch.randn(t, cfg.hidden_size, generator=g)
        h[:, big] *= 8
        nv = int(vision_frac * t)
        na = t - nv if all_weighted else max(1, int(answer_frac * t))
        vis = torch.zeros(t, dtype=torch.bool)
        vis[2:2 + nv] = True if not all_weighted else False
        if all_weighted:
            vis[:nv] = True
        ans = torch.zeros(t, dtype=torch.bool)
        ans[t - na:] = True
        out.append(Sample(h.to(dtype), rotary(cfg, t, dtype), vis, ans))
    return out


def settings(bits: int = 3, group: int | None = 32, abits: int = 16, sym: bool = False,
             scale_dtype: torch.dtype = torch.float32, **options) -> SearchSettings:
    return SearchSettings(scheme=QuantScheme(bits, group, sym), groups=LLAMA_LIKE_GROUPS, scale_dtype=scale_dtype,
                          abits=abits, options=options)


def calib(smps: list[Sample], r_attn: float = 1.0, r_mlp: float = 1.0, layer: int = 0) -> BlockCalib:
    return BlockCalib(samples=smps, sensitivity={layer: {"r_attn": r_attn, "r_mlp": r_mlp}})
