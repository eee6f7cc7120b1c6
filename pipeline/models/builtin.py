"""The built-in VLM: a small transformers-native LLaVA trained here on ``pipeline.data.synthetic``.

Why it exists: no real VLM weights can be downloaded on our machines, and random weights make
every quantization method look alike. The shipped folder (``BUILTIN_DIR``) is an ordinary
transformers model folder (config.json, model.safetensors, processor + tokenizer files with a chat
template), so every generic loader opens it with no special case.

Also here, because they belong to this model's recipe:
- ``build_processor``: the local BPE tokenizer + CLIP image processor + LLaVA chat template;
- ``build_config``: the architecture (CLIP vision tower, 2-layer projector, Llama language model);
- ``plant_outliers``: the exact, function-preserving per-channel rescaling that turns the trained
  model into its "outlier" variant (heavy activation channels like real LLMs have).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import synthetic
from ..errors import VlmqError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin_model"
#: The outlier variant ships beside the plain model when it fits the size budget (see README there).
BUILTIN_OUTLIER_DIR = BUILTIN_DIR / "outlier"
IMAGE_TOKEN = "<image>"
PATCH_SIZE = 8
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's; the image processor uses the same
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-1.5 style: "USER: <image>\n{question} ASSISTANT: {answer}</s>". Content may be a string
# or a list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'system' %}{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class BuiltinSize:
    """Architecture knobs. Language-model widths are multiples of 128 so g128 quantization applies."""

    text_hidden: int = 256
    text_intermediate: int = 512
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    vision_hidden: int = 128
    vision_intermediate: int = 256
    vision_layers: int = 2
    vision_heads: int = 4
    vocab_size: int = 512

    def __post_init__(self) -> None:
        for name in ("text_hidden", "text_intermediate"):
            if getattr(self, name) % 128:
                raise VlmqError(f"{name}={getattr(self, name)} is not a multiple of 128", "use 128, 256, 384, ...")


def chat_prompt(question: str) -> list[dict[str, Any]]:
    """The conversation for one synthetic question (one image, then the question)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def build_processor(vocab_size: int = 512):
    """LlavaProcessor around a local BPE tokenizer (trained on the generator's text) and CLIP's
    image processor at 48 px. Deterministic for a given tokenizers version; the trainer builds it
    once and ships the saved files, so token ids never depend on the machine."""
    from transformers import LlavaProcessor

    from .tokenizer import build_tokenizer

    tok = build_tokenizer(synthetic.corpus_texts(), vocab_size=vocab_size, extra_special_tokens=[IMAGE_TOKEN])
    tok.padding_side = "left"  # batched greedy generation
    tok.init_kwargs["padding_side"] = "left"
    s = synthetic.IMAGE_SIZE
    image_processor = _clip_image_processor(
        size={"height": s, "width": s},
        crop_size={"height": s, "width": s},
        do_center_crop=False,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def _clip_image_processor(**kw):
    """CLIPImageProcessor needs torchvision in transformers 5; fall back to its PIL twin without it."""
    try:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**kw)
    except ImportError:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(**kw)


def build_config(size: BuiltinSize, processor) -> Any:
    """The LlavaConfig: CLIP vision tower (last layer, CLS dropped), gelu projector, Llama LM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    n_img = (synthetic.IMAGE_SIZE // PATCH_SIZE) ** 2
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=synthetic.IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=size.vision_hidden,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=max(size.vocab_size, len(tok)),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=n_img,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    return cfg


def pixel_values(images: list) -> torch.Tensor:
    """Images (PIL or HxWx3 uint8) -> normalized ``[N, 3, H, W]`` float32, exactly what the
    processor computes for 48 px inputs (checked by the tests); the trainer uses it for speed."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images]).astype(np.float32) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def builtin_available(path: str | Path = BUILTIN_DIR) -> bool:
    """True when the trained model folder is present (weights, config and processor files)."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file()


def load_builtin(path: str | Path = BUILTIN_DIR, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor) of the built-in model, in eval mode. ``variant`` folders load the same way."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    p = Path(path)
    if not builtin_available(p):
        raise VlmqError(
            f"no built-in model at {p}",
            "train it with `python jobs/train_builtin.py` (GPU) or restore pipeline/builtin_model/ from git",
        )
    model = LlavaForConditionalGeneration.from_pretrained(p, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(p)
    return model, processor


def builtin_info(path: str | Path = BUILTIN_DIR) -> dict[str, Any]:
    """The training record shipped beside the weights (accuracies, recipe), or {}."""
    f = Path(path) / "builtin_info.json"
    return json.loads(f.read_text()) if f.is_file() else {}


# ---------------------------------------------------------------- RTN and the outlier variant


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the language model's decoder layers (what RTN quantizes)."""
    layers = model.model.language_model.layers
    return {f"model.language_model.layers.{n}": m for n, m in layers.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def rtn_fake_quant_(model: nn.Module, bits: int, group_size: int | None = 128) -> nn.Module:
    """In place: RTN fake quantization (``quant.quantizer.fake_quantize``) of every decoder-layer
    Linear; vision tower, projector, embeddings and lm_head stay as they are (METHODS.md §2)."""
    from ..quant.quantizer import QuantScheme, fake_quantize

    scheme = QuantScheme(bits, group_size)
    for lin in decoder_linears(model).values():
        lin.weight.data.copy_(fake_quantize(lin.weight.data, scheme, scale_dtype=torch.float16))
    return model


@torch.no_grad()
def plant_outliers(model: nn.Module, channels: dict[int, list[int]] | list[int], log2_k: int = 5) -> dict[str, Any]:
    """In place, function-preserving: for each decoder layer, multiply the chosen channels of both
    RMSNorm weights by ``k = 2**log2_k`` and divide the same input columns of the Linears they feed
    (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``) by ``k``.

    A power of two makes both products exact in floating point, so the fp outputs are bit-identical;
    only the activations entering those Linears get heavy channels (x k) and their weight columns
    become tiny (/ k), which is what makes real LLMs fragile under RTN and what AWQ/MBQ repair.
    ``channels`` is one list for every layer or ``{layer index: list}``.
    """
    k = float(2**log2_k)
    layers = model.model.language_model.layers
    record = {}
    for i, layer in enumerate(layers):
        ch = channels[i] if isinstance(channels, dict) else channels
        idx = torch.as_tensor(ch, dtype=torch.long, device=layer.input_layernorm.weight.device)
        for norm, lins in (
            (layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
            (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
        ):
            norm.weight.data[idx] *= k
            for lin in lins:
                lin.weight.data[:, idx] /= k
        record[i] = [int(c) for c in ch]
    return {"log2_k": log2_k, "channels": record}


def pick_outlier_channels(model: nn.Module, n: int, seed: int = 0) -> dict[int, list[int]]:
    """``n`` channels per layer, chosen where the input norm's weight is already largest (the
    channels the model relies on most), ties broken by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(model.model.language_model.layers):
        w = layer.input_layernorm.weight.detach().float().abs().cpu()
        w = w + 1e-6 * torch.rand(w.shape, generator=g)
        out[i] = sorted(torch.topk(w, n).indices.tolist())
    return out


def size_record(size: BuiltinSize) -> dict[str, Any]:
    return asdict(size)
