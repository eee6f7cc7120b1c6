"""Fixtures for the data tests: a local LLaVA processor with our own chat templates."""

from __future__ import annotations

import random

import pytest
from calib_fixtures import CHATML_LIKE, CROP, LLAVA_LIKE, PATCH, rand_text

from pipeline.models.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    corpus = [rand_text(random.Random(i), 3, 12) for i in range(200)] + ["USER: ASSISTANT: Describe this image."]
    return build_tokenizer(corpus, vocab_size=320, extra_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"])


def make_processor(tokenizer, template: str):
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})
    return LlavaProcessor(
        image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="full", chat_template=template,
    )


@pytest.fixture(scope="session", params=["llava_like", "chatml_like"])
def processor(request, tokenizer):
    return make_processor(tokenizer, LLAVA_LIKE if request.param == "llava_like" else CHATML_LIKE)


@pytest.fixture(scope="session")
def llava_processor(tokenizer):
    return make_processor(tokenizer, LLAVA_LIKE)


