"""Tiny processors: real classes, chat templates, answer masks, offline save/load, speed."""

from __future__ import annotations

import time

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.utils.chat_template_utils import render_jinja_template
from model_fixtures import FAMILIES, adapter, chat_inputs, tiny, no_grad_one_thread  # noqa: F401 (fixtures)

from pipeline.models.processors import load_processor, torchvision_available
from pipeline.models.tiny import build_processor, build_tiny_tokenizer, shapes_corpus, tiny_image

PROCESSOR_CLASSES = {
    "llava": transformers.LlavaProcessor,
    "llava_onevision": transformers.LlavaOnevisionProcessor,
    "qwen2_vl": transformers.Qwen2VLProcessor,
    "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
    "internvl": transformers.InternVLProcessor,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_processor_class_and_answer_mask(tiny, family):
    _, processor = tiny.model(family)
    assert isinstance(processor, PROCESSOR_CLASSES[family])
    assert type(processor).__name__ == PROCESSOR_CLASSES[family].__name__
    answer = "The star is purple."
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": tiny_image(61)},
                                     {"type": "text", "text": "What colour is the star?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    end = "</s>" if family == "llava" else "<|im_end|>"
    # the template marks exactly the answer and its end token as generated text
    rendered, spans = render_jinja_template([msgs], chat_template=processor.chat_template,
                                            return_assistant_tokens_mask=True)
    assert [rendered[0][a:b].strip() for a, b in spans[0]] == [answer + end]
    if Version(transformers.__version__) < Version("5.23"):
        return  # older releases misalign the token mask once image tokens are expanded
    out = processor.apply_chat_template([msgs], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, return_tensors="pt")
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    tok = processor.tokenizer
    marked = tok.decode(ids[mask].tolist()).strip()
    assert marked == answer + end
    # the answer tokens come after every image token
    vis = adapter(family).vision_mask(ids, tiny.model(family)[0].config)
    assert vis.any() and vis.nonzero().max() < mask.nonzero().min()


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_processor_loads_offline_and_agrees(tiny, family):
    _, processor = tiny.model(family)
    loaded = load_processor(tiny.saved(family))
    assert isinstance(loaded, PROCESSOR_CLASSES[family])
    a = chat_inputs(processor, seeds=(62, 63), sizes=((33, 47), (58, 29)))
    b = chat_inputs(loaded, seeds=(62, 63), sizes=((33, 47), (58, 29)))
    assert sorted(a) == sorted(b)
    # where torchvision exists, AutoProcessor picks its backend: same pipeline, float-level differences
    same_backend = type(loaded.image_processor).__name__ == type(processor.image_processor).__name__
    for k in a:
        if k == "pixel_values" and not same_backend:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0.05)
        else:
            assert torch.equal(a[k], b[k]), k
    if family == "llava" or torchvision_available():
        auto = transformers.AutoProcessor.from_pretrained(tiny.saved(family), local_files_only=True)
        assert type(auto).__name__ == PROCESSOR_CLASSES[family].__name__


def test_tokenizer_is_deterministic_and_round_trips():
    t1, t2 = build_tiny_tokenizer("internvl"), build_tiny_tokenizer("internvl")
    text = "A purple diamond next to 7 green stars? Zebra!"  # words outside the corpus too
    assert t1.encode(text) == t2.encode(text)
    assert t1.decode(t1.encode(text, add_special_tokens=False)) == text
    assert len(t1.encode(shapes_corpus()[0])) < len(shapes_corpus()[0]) // 2  # the BPE learned merges
    # InternVL's processor reads these named tokens from the tokenizer
    assert t1.convert_ids_to_tokens(t1.start_image_token_id) == "<img>"
    assert t1.context_image_token == "<IMG_CONTEXT>"


def test_forward_with_one_image_is_fast(tiny):
    for family in FAMILIES:
        model, processor = tiny.model(family)
        model(**chat_inputs(processor))  # warm up
        times = []
        for seed in (64, 65, 66):
            t0 = time.perf_counter()
            model(**chat_inputs(processor, seeds=(seed,)))
            times.append(time.perf_counter() - t0)
        assert min(times) < 0.5, (family, times)


def test_build_processor_accepts_a_tokenizer():
    tok = build_tiny_tokenizer("qwen2_vl")
    p = build_processor("qwen2_vl", tokenizer=tok)
    assert p.tokenizer is tok
    assert p.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
