"""build_model / build_layers from saved folders, and the spec checks built on the meta model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from model_fixtures import FAMILIES, adapter, chat_inputs, tiny, no_grad_one_thread  # noqa: F401 (fixtures)
from safetensors.torch import load_file, save_file

from pipeline.errors import VlmqError
from pipeline.models.loading import (
    build_layers,
    build_meta_model,
    build_model,
    check_group_size,
    estimate_memory,
    layer_linear_names,
)
from pipeline.models.tiny import tiny_config
from pipeline.models.weights import WeightSource, open_source


class Recording(WeightSource):
    """Wraps a source and records every tensor read."""

    def __init__(self, inner: WeightSource):
        self.inner, self.read = inner, []
        self.model_dir = inner.model_dir

    @property
    def config_dict(self):
        return self.inner.config_dict

    def keys(self):
        return self.inner.keys()

    def shape(self, name):
        return self.inner.shape(name)

    def dtype(self, name):
        return self.inner.dtype(name)

    def get(self, name):
        self.read.append(name)
        return self.inner.get(name)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_gives_identical_logits(tiny, family):
    model, processor = tiny.model(family)
    a = adapter(family)
    src = Recording(open_source(tiny.saved(family)))
    built = build_model(src, a)
    assert sorted(src.read) == sorted(src.keys())  # each tensor read once
    assert not built.training and built.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in built.parameters())
    inputs = chat_inputs(processor, seeds=(41,), sizes=((50, 36),))
    torch.testing.assert_close(built(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_tied_embeddings_are_tied(tiny):
    a = adapter("internvl")
    src = open_source(tiny.saved("internvl"))
    assert "lm_head.weight" not in src.keys()
    built = build_model(src, a)
    assert built.lm_head.weight is built.get_submodule(a.embed_path).weight


def test_build_model_casts_dtype(tiny):
    model, _ = tiny.model("qwen2_vl")
    built = build_model(open_source(tiny.saved("qwen2_vl")), adapter("qwen2_vl"), dtype=torch.bfloat16)
    ref = dict(model.named_parameters())
    for n, p in built.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, ref[n].to(torch.bfloat16)), n


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_build_layers_reads_only_its_layers(tiny, family):
    model, processor = tiny.model(family)
    a = adapter(family)
    src = Recording(open_source(tiny.saved(family)))
    layers = build_layers(src, a, [1], dtype=torch.float32)
    want = {k for k in src.keys() if k.startswith(a.layers_path + ".1.")}
    assert set(src.read) == want and len(src.read) == len(want)
    (layer,) = layers
    full = model.get_submodule(a.layers_path)[1]
    assert type(layer) is type(full) and layer.self_attn.layer_idx == 1
    full_sd = full.state_dict()
    assert set(layer.state_dict()) == set(full_sd)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, full_sd[k]), k
    # and it computes what the full model's layer 1 computes
    from pipeline.models.layer_io import capture_layer_io
    from pipeline.quant.types import layer_forward

    ins, outs, kw = capture_layer_io(model, model.get_submodule(a.layers_path), chat_inputs(processor, seeds=(42,)))
    torch.testing.assert_close(layer_forward(layer, ins[1][0], kw), outs[1][0], rtol=1e-5, atol=1e-6)


def test_build_layers_rejects_bad_ids(tiny):
    with pytest.raises(VlmqError, match="layer 5 does not exist"):
        build_layers(open_source(tiny.saved("llava")), adapter("llava"), [5])


def test_missing_tensor_is_an_error(tiny, tmp_path):
    d = tiny.saved("llava")
    for f in d.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(d / "model.safetensors")
    dropped = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
    del tensors[dropped]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(VlmqError, match="lacks"):
        build_model(open_source(tmp_path), adapter("llava"))
    with pytest.raises(VlmqError, match="decoder layer 1"):
        build_layers(open_source(tmp_path), adapter("llava"), [1])
    assert len(build_layers(open_source(tmp_path), adapter("llava"), [0])) == 1


def test_meta_model_has_no_storage():
    cfg = tiny_config("qwen2_vl").to_dict()
    meta = build_meta_model(cfg, adapter("qwen2_vl"))
    assert all(p.device.type == "meta" for p in meta.parameters())
    # buffers computed in __init__ (rotary tables) are real, so a loaded model can run
    inv = meta.get_submodule(adapter("qwen2_vl").language_model_path).rotary_emb.inv_freq
    assert inv.device.type == "cpu" and torch.isfinite(inv).all() and inv.abs().sum() > 0


def test_check_group_size_names_the_layer():
    a = adapter("llava_onevision")
    cfg = tiny_config("llava_onevision").to_dict()
    check_group_size(cfg, a, 32)
    check_group_size(cfg, a, 64)
    check_group_size(cfg, a, 0)  # per-channel
    with pytest.raises(VlmqError) as e:
        check_group_size(cfg, a, 128)
    assert "model.language_model.layers.0.self_attn.q_proj" in str(e.value) and "64" in str(e.value)
    # only down_proj fails: intermediate 160 is not a multiple of 64, hidden 64 is
    odd = copy.deepcopy(cfg)
    odd["text_config"]["intermediate_size"] = 160
    check_group_size(odd, a, 32)
    with pytest.raises(VlmqError) as e:
        check_group_size(odd, a, 64)
    assert "model.language_model.layers.0.mlp.down_proj" in str(e.value)
    assert "in_features=160" in str(e.value) and "[32]" in str(e.value)


def test_group_sizes_of_the_tiny_models():
    for fam in FAMILIES:
        cfg = tiny_config(fam).to_dict()
        for g in (32, 64):
            check_group_size(cfg, adapter(fam), g)
    for fam in ("llava", "qwen2_vl"):
        check_group_size(tiny_config(fam).to_dict(), adapter(fam), 128)


def test_layer_linear_names():
    assert layer_linear_names(adapter("qwen2_vl")) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]


# Parameter counts by hand from the tiny configs (tiny.py), per part, to check estimate_memory.
def _lm_layer_params(h, inter, heads, kv, bias):
    hd = h // heads
    attn = h * h + 2 * h * kv * hd + h * h + (h + 2 * kv * hd if bias else 0)
    return attn + 3 * h * inter + 2 * h


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_memory_by_hand(tiny, family):
    a = adapter(family)
    cfg = json.loads((tiny.saved(family) / "config.json").read_text())
    est = estimate_memory(cfg, a, torch.float16)
    t = cfg["text_config"]
    h, inter, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    bias = family != "llava"  # Qwen2 q/k/v have biases, Llama's none
    layer = _lm_layer_params(h, inter, t["num_attention_heads"], t["num_key_value_heads"], bias)
    assert est.layer_bytes == [2 * layer] * 2
    assert est.other_bytes["embeddings"] == 2 * v * h
    assert est.other_bytes["lm_head"] == (0 if family == "internvl" else 2 * v * h)
    assert est.other_bytes["final_norm"] == 2 * h
    # vision tower + projector: compare with the real model's parameters (counted once each)
    model, _ = tiny.model(family)
    vis = sum(p.numel() for n, p in model.named_parameters() if a.is_vision(n))
    assert est.vision_bytes == 2 * vis
    proj = sum(p.numel() for n, p in model.named_parameters() if n.startswith(a.projector_path + "."))
    assert est.other_bytes["projector"] == 2 * proj > 0
    assert est.total_bytes == 2 * sum(p.numel() for p in model.parameters())
    assert estimate_memory(cfg, a, torch.float32).total_bytes == 2 * est.total_bytes


# config.json of real Hub checkpoints (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct), verbatim
# except unrelated keys, with their published parameter counts: the meta model must give these.
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
QWEN2_VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


@pytest.mark.parametrize("cfg,family,params,layers", [
    (LLAVA_15_7B, "llava", 7_063_427_072, 32),
    (QWEN2_VL_7B, "qwen2_vl", 8_291_375_616, 28),
])
def test_real_configs_on_the_meta_device(cfg, family, params, layers):
    from pipeline.models import detect_adapter

    a = detect_adapter(cfg)
    assert a.family == family
    est = estimate_memory(cfg, a, torch.bfloat16)
    assert est.total_bytes == 2 * params and len(est.layer_bytes) == layers
    h, inter = (4096, 11008) if family == "llava" else (3584, 18944)
    kv = h if family == "llava" else 512  # Qwen2-VL-7B: 4 KV heads of 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h + (0 if family == "llava" else h + 2 * kv)
    assert est.layer_bytes == [2 * per_layer] * layers
    check_group_size(cfg, a, 128)
    with pytest.raises(VlmqError, match=r"in_features=\d+ of model\.language_model\.layers\.0\.self_attn\.q_proj"):
        check_group_size(cfg, a, 96)
