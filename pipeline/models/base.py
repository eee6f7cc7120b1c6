"""What the pipeline needs to know about a VLM family, declared as data.

One ``VLMAdapter`` per family. Everything the pipeline does with a model goes through these
fields (module paths are *module names* of the transformers 5 class, i.e. keys of
``model.state_dict()`` without the parameter suffix). No ``if arch == ...`` elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..quant.types import LinearGroup

# The standard decoder-layer groups of Llama/Qwen2-style language models (METHODS.md §3).
LLAMA_LIKE_GROUPS: tuple[LinearGroup, ...] = (
    LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "attn"),
    LinearGroup("o", ("self_attn.o_proj",), "self_attn.v_proj", "attn"),
    LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
    LinearGroup("down", ("mlp.down_proj",), "mlp.up_proj", "mlp"),
)


@dataclass(frozen=True)
class VLMAdapter:
    family: str  # "llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl"
    model_types: tuple[str, ...]  # config.json "model_type" values this adapter accepts
    model_class: str  # transformers class, e.g. "LlavaForConditionalGeneration"
    processor_class: str  # transformers processor class, e.g. "LlavaProcessor"
    layers_path: str  # the decoder-layer ModuleList, e.g. "model.language_model.layers"
    language_model_path: str  # e.g. "model.language_model"
    embed_path: str  # token embeddings
    final_norm_path: str
    lm_head_path: str
    vision_paths: tuple[str, ...]  # vision tower + projector: never quantized by default
    image_token_attr: str  # config attribute with the id of the (expanded) image token
    projector_path: str = ""  # the part of ``vision_paths`` that maps vision features into the LM
    text_config_attr: str = "text_config"
    linear_groups: tuple[LinearGroup, ...] = LLAMA_LIKE_GROUPS
    # Regex rewrites from on-disk checkpoint keys (any historical layout) to module names.
    checkpoint_key_rules: tuple[tuple[str, str], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def image_token_id(self, config: Any) -> int:
        return int(getattr(config, self.image_token_attr))

    def vision_mask(self, input_ids: torch.Tensor, config: Any) -> torch.Tensor:
        """Vision-token positions *after* expansion: the processor already expanded them."""
        return input_ids == self.image_token_id(config)

    def text_config(self, config: Any) -> Any:
        return getattr(config, self.text_config_attr)

    def num_layers(self, config: Any) -> int:
        return int(self.text_config(config).num_hidden_layers)

    def module_key(self, checkpoint_key: str) -> str:
        """Map an on-disk key to the module name used everywhere in vlmq."""
        for pattern, repl in self.checkpoint_key_rules:
            new, n = re.subn(pattern, repl, checkpoint_key)
            if n:
                return new
        return checkpoint_key

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def layer_index(self, module_name: str) -> int | None:
        """The decoder-layer index a module/tensor name belongs to, or None outside the decoder layers."""
        prefix = self.layers_path + "."
        if not module_name.startswith(prefix):
            return None
        head = module_name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def is_vision(self, module_name: str) -> bool:
        """True for tensors of the vision tower or projector (kept in 16-bit by default)."""
        return any(module_name == p or module_name.startswith(p + ".") for p in self.vision_paths)
