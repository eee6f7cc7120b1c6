"""Adapters: family detection, module paths, and checkpoint key rules against real layouts."""

from __future__ import annotations

import json

import pytest
from model_fixtures import FAMILIES, adapter, tiny, no_grad_one_thread  # noqa: F401 (fixtures)
from safetensors import safe_open

from pipeline.errors import VlmqError
from pipeline.models import ADAPTERS, SUPPORTED_FAMILIES, detect_adapter
from pipeline.models.weights import read_safetensors_header


def test_registry_covers_the_five_families():
    assert set(SUPPORTED_FAMILIES) == {"llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl"}
    assert all(ADAPTERS[f].family == f for f in SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_adapter_from_dict_dir_and_file(tiny, family):
    d = tiny.saved(family)
    cfg = json.loads((d / "config.json").read_text())
    assert detect_adapter(cfg).family == family
    assert detect_adapter(d).family == family
    assert detect_adapter(str(d / "config.json")).family == family
    # architectures alone (an odd model_type) is enough
    assert detect_adapter({"model_type": "x", "architectures": [adapter(family).model_class]}).family == family


def test_detect_adapter_rejects_bert_and_lists_supported():
    with pytest.raises(VlmqError) as e:
        detect_adapter({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    msg = str(e.value)
    assert "bert" in msg and "BertForMaskedLM" in msg
    for a in ADAPTERS.values():
        assert a.model_class in msg


def test_detect_adapter_hints_remote_code_internvl():
    with pytest.raises(VlmqError) as e:
        detect_adapter({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]})
    assert "-hf" in str(e.value) and "InternVLForConditionalGeneration" in str(e.value)


def test_detect_adapter_missing_config(tmp_path):
    with pytest.raises(VlmqError, match="no config.json"):
        detect_adapter(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_paths_exist_in_the_model(tiny, family):
    model, processor = tiny.model(family)
    a = adapter(family)
    layers = model.get_submodule(a.layers_path)
    assert len(layers) == a.num_layers(model.config) == 2
    assert model.get_submodule(a.language_model_path).layers is layers
    emb = model.get_submodule(a.embed_path)
    assert emb.num_embeddings == model.config.get_text_config().vocab_size
    assert model.get_submodule(a.lm_head_path).out_features == emb.num_embeddings
    model.get_submodule(a.final_norm_path)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for p in a.vision_paths + (a.projector_path,):
        assert any(n == p or n.startswith(p + ".") for n in names), p
    for layer in layers:
        for g in a.linear_groups:
            layer.get_submodule(g.prev_op)
            for lin in g.linears:
                assert layer.get_submodule(lin).__class__.__name__ == "Linear"
    # the config's image token is the processor's (the one the processor expands)
    assert a.image_token_id(model.config) == processor.image_token_id
    # every parameter is vision, decoder layer, or one of the named LM parts
    for n in names:
        assert (a.is_vision(n) or a.layer_index(n) is not None or n.startswith(a.embed_path + ".")
                or n.startswith(a.final_norm_path + ".") or n.startswith(a.lm_head_path + ".")), n


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_keys_map_onto_state_dict(tiny, family):
    """save_pretrained writes the legacy layout; the rules must give exactly the module names."""
    model, _ = tiny.model(family)
    a = adapter(family)
    disk = list(read_safetensors_header(tiny.saved(family) / "model.safetensors"))
    with safe_open(str(tiny.saved(family) / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(disk)
    mapped = [a.module_key(k) for k in disk]
    assert len(set(mapped)) == len(mapped), "two on-disk keys map to one module name"
    sd = set(model.state_dict())
    tied = set(getattr(model, "_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    assert set(mapped) == sd - tied
    # the legacy layout really is on disk, so the rules were exercised
    assert sum(k != m for k, m in zip(disk, mapped)) > len(disk) // 2


# Keys as they appear in real Hub checkpoints (older layouts), and the module name they must get.
HUB_KEYS = {
    "llava": {  # llava-hf/llava-1.5-7b-hf
        "language_model.model.layers.1.self_attn.q_proj.weight": "model.language_model.layers.1.self_attn.q_proj.weight",
        "language_model.model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "language_model.model.norm.weight": "model.language_model.norm.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "vision_tower.vision_model.pre_layrnorm.weight": "model.vision_tower.pre_layrnorm.weight",
        "multi_modal_projector.linear_2.bias": "model.multi_modal_projector.linear_2.bias",
        # transformers 4.5x save_pretrained layout
        "model.vision_tower.vision_model.post_layernorm.bias": "model.vision_tower.post_layernorm.bias",
        "model.language_model.layers.0.mlp.down_proj.weight": "model.language_model.layers.0.mlp.down_proj.weight",
    },
    "llava_onevision": {  # llava-hf/llava-onevision-qwen2-7b-ov-hf
        "image_newline": "model.image_newline",
        "vision_tower.vision_model.encoder.layers.1.self_attn.out_proj.weight":
            "model.vision_tower.encoder.layers.1.self_attn.out_proj.weight",
        "language_model.model.layers.0.self_attn.k_proj.bias": "model.language_model.layers.0.self_attn.k_proj.bias",
        "language_model.lm_head.weight": "lm_head.weight",
    },
    "qwen2_vl": {  # Qwen/Qwen2-VL-7B-Instruct
        "model.layers.1.mlp.gate_proj.weight": "model.language_model.layers.1.mlp.gate_proj.weight",
        "model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "model.norm.weight": "model.language_model.norm.weight",
        "visual.blocks.0.attn.qkv.weight": "model.visual.blocks.0.attn.qkv.weight",
        "visual.merger.mlp.0.weight": "model.visual.merger.mlp.0.weight",
        "lm_head.weight": "lm_head.weight",
        "model.language_model.layers.0.self_attn.o_proj.weight": "model.language_model.layers.0.self_attn.o_proj.weight",
        "model.visual.patch_embed.proj.weight": "model.visual.patch_embed.proj.weight",
    },
    "qwen2_5_vl": {  # Qwen/Qwen2.5-VL-7B-Instruct
        "model.layers.0.self_attn.v_proj.bias": "model.language_model.layers.0.self_attn.v_proj.bias",
        "visual.blocks.1.mlp.down_proj.weight": "model.visual.blocks.1.mlp.down_proj.weight",
        "visual.merger.ln_q.weight": "model.visual.merger.ln_q.weight",
    },
    "internvl": {  # OpenGVLab/InternVL3-1B-hf
        "language_model.model.layers.1.post_attention_layernorm.weight":
            "model.language_model.layers.1.post_attention_layernorm.weight",
        "vision_tower.encoder.layer.0.attention.q_proj.weight": "model.vision_tower.encoder.layer.0.attention.q_proj.weight",
        "vision_tower.embeddings.cls_token": "model.vision_tower.embeddings.cls_token",
        "multi_modal_projector.layer_norm.weight": "model.multi_modal_projector.layer_norm.weight",
    },
}


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_layout_keys(tiny, family):
    model, _ = tiny.model(family)
    a = adapter(family)
    names = set(model.state_dict())
    for disk, want in HUB_KEYS[family].items():
        assert a.module_key(disk) == want, disk
        assert want in names, want  # the target really is a tensor of the architecture
