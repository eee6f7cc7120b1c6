"""Tiny random-weight models of every family, built from the real transformers config classes.

For tests and the demo: 2 decoder layers, a 2-layer vision tower, 28-112 px images, a local
tokenizer trained on a fixed corpus about coloured shapes, and the family's real Processor class
with a chat template. Decoder Linears have in_features divisible by 32 and 64 in every family;
LLaVA and Qwen2-VL also by 128 (hidden 128, intermediate 256), the others not (hidden 64), so
group-size errors can be tested.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedTokenizerFast, ProcessorMixin

from .processors import make_processor, torchvision_available
from .tokenizer import build_tokenizer

TINY_FAMILIES: tuple[str, ...] = ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl")
TINY_VOCAB = 512

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")


def shapes_corpus() -> list[str]:
    """A fixed small English corpus about coloured shapes (captions, questions, answers)."""
    out: list[str] = []
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            p = PLACES[(i + j) % len(PLACES)]
            c2 = COLOURS[(i + j + 1) % len(COLOURS)]
            out += [
                f"A {c} {s} in the {p} of the image.",
                f"There is a {c} {s} next to a {c2} {SHAPES[(j + 1) % len(SHAPES)]}.",
                f"What colour is the {s}? The {s} is {c}.",
                f"Where is the {c} {s}? It is in the {p}.",
                f"How many shapes are there? There are {i + j + 1} shapes.",
            ]
    out += ["Describe the image.", "Yes.", "No.", "The background is white.", "Answer with one word."]
    return out


# -- chat templates ------------------------------------------------------------------------------
# Assistant content is wrapped in {% generation %} so apply_chat_template(...,
# return_assistant_tokens_mask=True) marks answer tokens.

_CONTENT = (
    "{%- macro render(content, image) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for c in content -%}"
    "{%- if c['type'] == 'image' -%}{{ image }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _chatml_template(image: str) -> str:
    """Qwen-style ChatML, used by LLaVA-OneVision, Qwen2-VL/2.5-VL and InternVL."""
    return (
        _CONTENT + "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ render(m['content'], '') }}{{ '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' }}{{ render(m['content'], '" + image + "') }}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


LLAVA_TEMPLATE = (
    _CONTENT + "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ render(m['content'], '') + ' ' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'USER: ' }}{{ render(m['content'], '<image>\\n') }}{{ ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}{% generation %}{{ render(m['content'], '') }}{{ '</s>' }}{% endgeneration %}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_CHATML = ("<|im_start|>", "<|im_end|>")


# -- per-family specs ----------------------------------------------------------------------------


def _text_config(hidden: int, kv_heads: int, model_type: str | None) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    )
    if model_type:
        cfg["model_type"] = model_type
    return cfg


def _qwen_text(hidden: int) -> dict[str, Any]:
    cfg = _text_config(hidden, 2, None)
    half = hidden // 4 // 2  # head_dim / 2, split over (t, h, w)
    t = half // 4
    h = (half - t) // 2
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, h, half - t - h]}
    return cfg


@functools.cache
def _tokens(family: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(special tokens in id order, named tokens) of a family's tokenizer."""
    if family == "llava":
        return ("<image>",), (("image_token", "<image>"),)
    if family == "llava_onevision":
        return ("<image>", "<video>") + _CHATML, (("image_token", "<image>"), ("video_token", "<video>"))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        toks = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>") + _CHATML
        return toks, (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"))
    if family == "internvl":
        toks = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>") + _CHATML
        named = (
            ("start_image_token", "<img>"),
            ("end_image_token", "</img>"),
            ("context_image_token", "<IMG_CONTEXT>"),
            ("video_token", "<video>"),
        )
        return toks, named
    raise KeyError(family)


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        from ..errors import VlmqError

        raise VlmqError(f"no tiny model for family {family!r}", f"use one of {', '.join(TINY_FAMILIES)}")


def build_tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The family's local tokenizer (deterministic: same corpus, same ids)."""
    _check_family(family)
    specials, named = _tokens(family)
    tok = build_tokenizer(
        shapes_corpus(), vocab_size=384, extra_special_tokens=specials, named_special_tokens=dict(named)
    )
    assert len(tok) <= TINY_VOCAB, len(tok)
    return tok


def tiny_config(family: str, tokenizer: PreTrainedTokenizerFast | None = None) -> transformers.PretrainedConfig:
    """A real config object of the family, tiny; token ids agree with ``build_tiny_tokenizer``."""
    _check_family(family)
    tok = tokenizer or build_tiny_tokenizer(family)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

    def tid(t: str) -> int:
        return int(tok.convert_tokens_to_ids(t))

    if family == "llava":
        cfg = transformers.LlavaConfig(
            text_config={**_text_config(128, 4, "llama"), **ids},
            vision_config=dict(
                model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=28, patch_size=7, projection_dim=32,
            ),
            image_token_index=tid("<image>"),
            image_seq_length=16,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    elif family == "llava_onevision":
        cfg = transformers.LlavaOnevisionConfig(
            text_config={**_text_config(64, 2, "qwen2"), **ids},
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=28, patch_size=7, vision_use_head=False,
            ),
            image_token_index=tid("<image>"),
            video_token_index=tid("<video>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
            vision_aspect_ratio="anyres_max_9",
        )
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        hidden = 128 if family == "qwen2_vl" else 64
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
            cls = transformers.Qwen2VLConfig
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden, num_heads=2,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
            cls = transformers.Qwen2_5_VLConfig
        cfg = cls(
            text_config={**_qwen_text(hidden), **ids},
            vision_config=vision,
            image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"),
        )
    else:  # internvl
        cfg = transformers.InternVLConfig(
            text_config={**_text_config(64, 2, "qwen2"), **ids},
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=28, patch_size=7,
            ),
            image_token_id=tid("<IMG_CONTEXT>"),
            image_seq_length=4,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
        )
    for k, v in ids.items():
        setattr(cfg, k, v)
    return cfg


def _image_processor(family: str) -> Any:
    """The family's real image-processor class (PIL backend: available with or without torchvision)."""
    if family == "llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        return LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil(
            size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]]
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14, merge_size=2,
            temporal_patch_size=2,
        )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                    max_patches=4)


def _video_processor(family: str) -> Any:
    """A real video processor where torchvision exists, else None (see processors.py)."""
    if not torchvision_available():
        return None
    name = {"llava_onevision": "LlavaOnevisionVideoProcessor", "qwen2_vl": "Qwen2VLVideoProcessor",
            "qwen2_5_vl": "Qwen2VLVideoProcessor", "internvl": "InternVLVideoProcessor"}[family]
    return getattr(transformers, name)()


def build_processor(family: str, tokenizer: PreTrainedTokenizerFast | None = None) -> ProcessorMixin:
    """The family's real Processor class around its real image processor and a local tokenizer."""
    _check_family(family)
    tok = tokenizer or build_tiny_tokenizer(family)
    ip = _image_processor(family)
    if family == "llava":
        return transformers.LlavaProcessor(
            image_processor=ip, tokenizer=tok, patch_size=7, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE, image_token="<image>",
        )
    if family == "llava_onevision":
        return make_processor(
            transformers.LlavaOnevisionProcessor, video_processor=_video_processor(family), image_processor=ip,
            tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
            chat_template=_chatml_template("<image>\n"), vision_aspect_ratio="anyres_max_9",
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        cls = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        return make_processor(
            cls, video_processor=_video_processor(family), image_processor=ip, tokenizer=tok,
            chat_template=_chatml_template("<|vision_start|><|image_pad|><|vision_end|>"),
        )
    return make_processor(
        transformers.InternVLProcessor, video_processor=_video_processor(family), image_processor=ip,
        tokenizer=tok, image_seq_length=4, chat_template=_chatml_template("<IMG_CONTEXT>\n"),
    )


def build_tiny_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, ProcessorMixin]:
    """A random-weight model of the family (eval mode, sdpa attention) and its processor."""
    _check_family(family)
    tok = build_tiny_tokenizer(family)
    cfg = tiny_config(family, tok)
    from .families import ALL_ADAPTERS

    adapter = next(a for a in ALL_ADAPTERS if a.family == family)
    model_cls = getattr(transformers, adapter.model_class)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = model_cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model = model.to(dtype).eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
    return model, build_processor(family, tok)


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors and processor files of a tiny model; returns the folder.

    Loads offline with ``open_source(out_dir)`` and ``load_processor(out_dir)`` (``AutoProcessor``
    too, for LLaVA everywhere and for every family where torchvision is installed).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_model(family, seed=seed, dtype=dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    meta = {"family": family, "seed": seed, "generator": "pipeline.models.tiny"}
    (out / "tiny.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def tiny_image(seed: int = 0, size: tuple[int, int] = (40, 52)) -> Any:
    """A random RGB PIL image (fresh pixels per seed), for tests and examples."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8))
