"""The supported VLM families, as data (module paths of the transformers 5 classes).

Checkpoint key rules: transformers 5 keeps a conversion table (``transformers/conversion_mapping.py``)
because the files on disk use older layouts than the module tree. ``save_pretrained`` writes the
legacy layout back (LLaVA-style models write ``language_model.model.layers...``; Qwen2-VL writes
``model.layers...`` and ``visual...``), and Hub checkpoints use it too (with an extra
``vision_model.`` level inside CLIP/SigLIP towers). The rules below map every layout seen (legacy,
4.5x ``model.``-prefixed, and current) onto module names; the first matching rule wins.
"""

from __future__ import annotations

import dataclasses

from .base import LLAMA_LIKE_GROUPS, VLMAdapter

# LLaVA, LLaVA-OneVision and InternVL share the llava layout (conversion_mapping: "llava"/"llava_next").
LLAVA_STYLE_RULES: tuple[tuple[str, str], ...] = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.", "model.language_model."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
)

# Qwen2-VL / Qwen2.5-VL (conversion_mapping: "Qwen2VLForConditionalGeneration").
QWEN_VL_RULES: tuple[tuple[str, str], ...] = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
)

_LM = "model.language_model"

LLAVA = VLMAdapter(
    family="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    layers_path=f"{_LM}.layers",
    language_model_path=_LM,
    embed_path=f"{_LM}.embed_tokens",
    final_norm_path=f"{_LM}.norm",
    lm_head_path="lm_head",
    vision_paths=("model.vision_tower", "model.multi_modal_projector"),
    projector_path="model.multi_modal_projector",
    image_token_attr="image_token_id",  # LlavaConfig maps it to image_token_index
    linear_groups=LLAMA_LIKE_GROUPS,
    checkpoint_key_rules=LLAVA_STYLE_RULES,
)

# LLaVA-OneVision's layout is LLaVA's plus image_newline, a learned vector inserted after each
# row of image features (part of the vision side, never quantized).
LLAVA_ONEVISION = dataclasses.replace(
    LLAVA,
    family="llava_onevision",
    model_types=("llava_onevision",),
    model_class="LlavaOnevisionForConditionalGeneration",
    processor_class="LlavaOnevisionProcessor",
    vision_paths=(*LLAVA.vision_paths, "model.image_newline"),
)

QWEN2_VL = VLMAdapter(
    family="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    layers_path=f"{_LM}.layers",
    language_model_path=_LM,
    embed_path=f"{_LM}.embed_tokens",
    final_norm_path=f"{_LM}.norm",
    lm_head_path="lm_head",
    vision_paths=("model.visual",),
    projector_path="model.visual.merger",  # the patch merger is Qwen2-VL's projector
    image_token_attr="image_token_id",
    linear_groups=LLAMA_LIKE_GROUPS,
    checkpoint_key_rules=QWEN_VL_RULES,
    extra={"mrope": True},
)

# Qwen2.5-VL's language side is Qwen2-VL's; only the classes (and the vision tower inside) differ.
QWEN2_5_VL = dataclasses.replace(
    QWEN2_VL,
    family="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
)

INTERNVL = VLMAdapter(
    family="internvl",
    model_types=("internvl",),
    model_class="InternVLForConditionalGeneration",
    processor_class="InternVLProcessor",
    layers_path=f"{_LM}.layers",
    language_model_path=_LM,
    embed_path=f"{_LM}.embed_tokens",
    final_norm_path=f"{_LM}.norm",
    lm_head_path="lm_head",
    vision_paths=("model.vision_tower", "model.multi_modal_projector"),
    projector_path="model.multi_modal_projector",
    image_token_attr="image_token_id",  # the <IMG_CONTEXT> token; <img>/</img> around it are text
    linear_groups=LLAMA_LIKE_GROUPS,
    checkpoint_key_rules=LLAVA_STYLE_RULES,
)

ALL_ADAPTERS: tuple[VLMAdapter, ...] = (LLAVA, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, INTERNVL)
