"""The two facts the whole pipeline stands on, for every family:

(a) the adapter's vision mask marks exactly the positions where the model inserts image features;
(b) each decoder layer replayed alone on its captured input, with layer 0's cleaned kwargs,
    reproduces the full model's output of that layer (M-RoPE included).
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import FAMILIES, adapter, chat_inputs, tiny, no_grad_one_thread  # noqa: F401 (fixtures)

from pipeline.models import clean_layer_kwargs
from pipeline.models.layer_io import capture_layer_io
from pipeline.quant.types import layer_forward

# two images of different sizes in one padded batch: counts differ per sample for anyres/Qwen
SIZES = ((40, 52), (61, 30))


def _feature_rows(out) -> int:
    po = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(po, (list, tuple)):
        return sum(int(t.shape[0]) for t in po)
    return int(po.shape[0] * po.shape[1]) if po.dim() == 3 else int(po.shape[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_mask_matches_inserted_features(tiny, family):
    model, processor = tiny.model(family)
    a = adapter(family)
    inputs = chat_inputs(processor, seeds=(11, 12), sizes=SIZES)
    mask = a.vision_mask(inputs["input_ids"], model.config)

    # the model's own image-feature output, called the way its forward calls it
    kw = {k: inputs[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in inputs}
    n_features = _feature_rows(model.model.get_image_features(**kw))
    assert int(mask.sum()) == n_features > 0

    # and the positions: where the language model's input differs from the plain token embeddings
    seen = {}
    lm = model.get_submodule(a.language_model_path)
    h = lm.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        h.remove()
    text = model.get_submodule(a.embed_path)(inputs["input_ids"])
    replaced = (seen["inputs_embeds"] != text).any(-1)
    assert torch.equal(replaced, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_replay_reproduces_full_forward(tiny, family):
    model, processor = tiny.model(family)
    a = adapter(family)
    inputs = chat_inputs(processor, seeds=(21,), sizes=((48, 44),))
    layers = model.get_submodule(a.layers_path)
    # use_cache=True: the captured kwargs carry a live cache, which cleaning must remove
    ins, outs, kw = capture_layer_io(model, layers, inputs, use_cache=True)
    assert "past_key_values" not in kw and "use_cache" not in kw
    assert "position_embeddings" in kw
    for i, layer in enumerate(layers):
        y = layer_forward(layer, ins[i][0], kw)
        torch.testing.assert_close(y, outs[i][0], rtol=1e-5, atol=1e-6)
    # the layer inputs chain: layer i+1 receives layer i's output
    torch.testing.assert_close(ins[1], outs[0], rtol=0, atol=0)


def test_mrope_is_what_the_replay_needs(tiny):
    """Negative control: Qwen2-VL replayed with plain 1-D RoPE positions must NOT match, so the
    replay test above really checks that the captured M-RoPE embeddings are used."""
    model, processor = tiny.model("qwen2_vl")
    a = adapter("qwen2_vl")
    inputs = chat_inputs(processor, seeds=(31,), sizes=((64, 64),))
    layers = model.get_submodule(a.layers_path)
    ins, outs, kw = capture_layer_io(model, layers, inputs)
    T = inputs["input_ids"].shape[1]
    pos = torch.arange(T)[None, None, :].expand(3, 1, T)  # text-only positions on all 3 axes
    rotary = model.get_submodule(a.language_model_path).rotary_emb
    plain = dict(kw, position_embeddings=rotary(ins[0], pos))
    y_plain = layer_forward(layers[0], ins[0][0], plain)
    assert (y_plain - outs[0][0]).abs().max() > 1e-3
    y = layer_forward(layers[0], ins[0][0], kw)
    torch.testing.assert_close(y, outs[0][0], rtol=1e-5, atol=1e-6)


def test_clean_layer_kwargs_rule():
    cache = object()
    pe = (torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    mask = torch.rand(1, 1, 5, 5) > 0.5
    raw = {
        "hidden_states": torch.randn(1, 5, 8),
        "attention_mask": mask,
        "position_ids": torch.arange(5)[None],
        "position_embeddings": pe,
        "past_key_values": cache,
        "past_key_value": cache,
        "use_cache": True,
        "cache_position": torch.arange(5),
        "output_attentions": False,
        "logits_to_keep": 0,
        "image_sizes": None,
        "some_object": cache,
    }
    out = clean_layer_kwargs(raw)
    assert set(out) == {"attention_mask", "position_ids", "position_embeddings", "logits_to_keep", "image_sizes"}
    assert out["attention_mask"] is not mask and torch.equal(out["attention_mask"], mask)
    assert all(torch.equal(x, y) for x, y in zip(out["position_embeddings"], pe))
