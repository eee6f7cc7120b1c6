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


OUTLIER_SITES = ("norm", "up", "v")


def _as_site_channels(channels, n_layers: int) -> dict[int, dict[str, list[int]]]:
    """Accept ``[c...]`` (norm site, every layer), ``{layer: [c...]}`` or ``{layer: {site: [c...]}}``."""
    if isinstance(channels, (list, tuple)):
        return {i: {"norm": list(channels)} for i in range(n_layers)}
    out = {}
    for i, v in channels.items():
        out[int(i)] = {"norm": list(v)} if isinstance(v, (list, tuple)) else {k: list(c) for k, c in v.items()}
    return out


def _o_columns(attn: nn.Module, v_rows: torch.Tensor) -> torch.Tensor:
    """o_proj input columns fed by the given v_proj output rows (every query head of the kv head)."""
    cfg = attn.config
    hd = attn.head_dim
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    kv_head, d = v_rows // hd, v_rows % hd
    cols = [(kv_head * groups + g) * hd + d for g in range(groups)]
    return torch.cat(cols)


@torch.no_grad()
def plant_outliers(model: nn.Module, channels, log2_k: int = 5) -> dict[str, Any]:
    """In place and function-preserving: plant heavy activation channels like real LLMs have.

    Per decoder layer and site, with ``k = 2**log2_k``:
    - ``norm``: residual channels c: both RMSNorm weights x k, the input columns c of the Linears
      they feed (q/k/v, gate/up) / k: the inputs of those Linears get outlier channels;
    - ``up``: intermediate channels j: up_proj rows x k, down_proj columns / k (down's input);
    - ``v``: v_proj rows x k, the o_proj columns they feed / k (o's input; exact since attention
      is linear in V).
    A power of two makes every product exact in floating point (barring fp16 underflow of tiny
    weights, see ``make_outlier_exact_``), so fp outputs stay bit-identical; RTN then crushes the
    shrunken columns, which is what AWQ/MBQ's scaling repairs. ``log2_k < 0`` undoes it.
    """
    k = float(2.0**log2_k)
    layers = model.model.language_model.layers
    spec = _as_site_channels(channels, len(layers))
    # Collect one power-of-two factor per row / column / norm entry, then scale every tensor once:
    # a weight touched by two sites (an up_proj row and column) keeps factor 1 and never rounds
    # through an intermediate value, so planting is exact in fp16 too.
    rows: dict[nn.Module, torch.Tensor] = {}
    cols: dict[nn.Module, torch.Tensor] = {}
    vecs: dict[nn.Module, torch.Tensor] = {}

    def scale(store, mod, n, idx, f):
        store.setdefault(mod, torch.ones(n, dtype=torch.float64))[idx] *= f

    for i, sites in spec.items():
        layer = layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        for site, ch in sites.items():
            idx = torch.as_tensor(ch, dtype=torch.long)
            if site == "norm":
                for norm, lins in (
                    (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                    (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
                ):
                    scale(vecs, norm, norm.weight.shape[0], idx, k)
                    for lin in lins:
                        scale(cols, lin, lin.in_features, idx, 1 / k)
            elif site == "up":
                scale(rows, mlp.up_proj, mlp.up_proj.out_features, idx, k)
                scale(cols, mlp.down_proj, mlp.down_proj.in_features, idx, 1 / k)
            elif site == "v":
                scale(rows, attn.v_proj, attn.v_proj.out_features, idx, k)
                scale(cols, attn.o_proj, attn.o_proj.in_features, _o_columns(attn, idx), 1 / k)
            else:
                raise ValueError(f"unknown outlier site {site!r}; use one of {OUTLIER_SITES}")
    for norm, f in vecs.items():
        norm.weight.data.mul_(f.to(norm.weight.device, norm.weight.dtype))
    for lin in set(rows) | set(cols):
        r = rows.get(lin, torch.ones(lin.out_features, dtype=torch.float64))
        c = cols.get(lin, torch.ones(lin.in_features, dtype=torch.float64))
        w = lin.weight.data
        lin.weight.data = (w.double() * (r[:, None] * c[None, :]).to(w.device)).to(w.dtype)
        if lin.bias is not None and lin in rows:
            lin.bias.data = (lin.bias.data.double() * r.to(w.device)).to(w.dtype)
    return {"log2_k": log2_k, "channels": {str(i): v for i, v in spec.items()}}


@torch.no_grad()
def make_outlier_exact_(model: nn.Module, channels, log2_k: int) -> None:
    """Round the plain fp16 weights once so that planting (and undoing) is exact in fp16: columns
    whose division by k would underflow into fp16 subnormals lose those last bits here, once."""
    plant_outliers(model, channels, log2_k)
    for p in model.parameters():
        p.copy_(p.half().to(p.dtype))
    plant_outliers(model, channels, -log2_k)


@torch.no_grad()
def input_abs_means(model: nn.Module, processor, samples) -> dict[tuple[int, str], torch.Tensor]:
    """Per decoder layer, ``mean |x_c|`` over real tokens of the inputs of q_proj ("q"), gate_proj
    ("gate"), down_proj ("down") and o_proj ("o"), on ``samples`` (synthetic scenes)."""
    from ..evaluate.vqa import build_prompts

    layers = model.model.language_model.layers
    sums: dict[tuple[int, str], torch.Tensor] = {}
    enc = processor(images=[s.image for s in samples], text=build_prompts(processor, [s.question for s in samples]),
                    padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()

    def hook(key):
        def fn(_m, inp):
            x = inp[0].detach().float().abs() * mask.to(inp[0].device).unsqueeze(-1)
            sums[key] = x.sum((0, 1)).cpu()
        return fn

    handles = []
    for i, layer in enumerate(layers):
        for name, lin in (("q", layer.self_attn.q_proj), ("gate", layer.mlp.gate_proj),
                          ("down", layer.mlp.down_proj), ("o", layer.self_attn.o_proj)):
            handles.append(lin.register_forward_pre_hook(hook((i, name))))
    device = next(model.parameters()).device
    try:
        model(**{k: (v.to(device, next(model.parameters()).dtype) if v.is_floating_point() else v.to(device))
                 for k, v in enc.items()}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = float(mask.sum())
    return {k: v / n for k, v in sums.items()}


def channel_importance(model: nn.Module, processor, samples) -> dict[int, dict[str, torch.Tensor]]:
    """Salience of each site's channels: ``mean|x_c| * ||W[:, c]||`` (the quantity AWQ protects),
    summed over the Linears that read the channel; keys are ``plant_outliers``' sites."""
    stats = input_abs_means(model, processor, samples)

    def wn(*lins):
        return torch.cat([lin.weight.detach().float().cpu() for lin in lins], 0).norm(dim=0)

    out = {}
    for i, layer in enumerate(model.model.language_model.layers):
        a, m = layer.self_attn, layer.mlp
        norm = stats[(i, "q")] * wn(a.q_proj, a.k_proj, a.v_proj) + stats[(i, "gate")] * wn(m.gate_proj, m.up_proj)
        o = stats[(i, "o")] * wn(a.o_proj)
        groups = a.config.num_attention_heads // a.config.num_key_value_heads
        kv, hd = a.config.num_key_value_heads, a.head_dim
        v = o.view(kv, groups, hd).sum(1).flatten()  # fold query heads onto their kv head's v rows
        out[i] = {"norm": norm, "up": stats[(i, "down")] * wn(m.down_proj), "v": v}
    return out


def outlier_ratios(model: nn.Module, processor, samples) -> dict[str, float]:
    """Largest ``mean|x_c|`` over the median channel, worst layer, per Linear input: how heavy the
    activation channels are (real LLMs: tens to thousands)."""
    stats = input_abs_means(model, processor, samples)
    out: dict[str, float] = {}
    for (_, name), v in stats.items():
        out[name] = max(out.get(name, 0.0), float(v.max() / v.median()))
    return out


def pick_outlier_channels(model: nn.Module, n, importance=None, seed: int = 0) -> dict[int, dict[str, list[int]]]:
    """Top-``n`` channels per layer and site by ``importance`` (``channel_importance``); without it,
    the norm site by input-norm weight magnitude. ``n``: an int (norm site) or ``{site: count}``.
    Ties are broken by a seeded jitter, so the choice is deterministic."""
    counts = {"norm": n} if isinstance(n, int) else dict(n)
    g = torch.Generator().manual_seed(seed)
    out: dict[int, dict[str, list[int]]] = {}
    for i, layer in enumerate(model.model.language_model.layers):
        out[i] = {}
        for site, c in counts.items():
            if not c:
                continue
            if importance is not None:
                w = importance[i][site].float()
            else:
                w = layer.input_layernorm.weight.detach().float().abs().cpu()
            w = w / w.max() + 1e-6 * torch.rand(w.shape, generator=g)
            out[i][site] = sorted(torch.topk(w, c).indices.tolist())
    return out


def size_record(size: BuiltinSize) -> dict[str, Any]:
    return asdict(size)


# ---------------------------------------------------------------- the shipped outlier variant

#: How the outlier variant is made from the trained model: k = 2**log2_k, channels per layer and
#: site, chosen by ``channel_importance`` on 64 calibration scenes. The chosen channels are recorded
#: in builtin_info.json ("outlier_variant"), so the variant never depends on re-measuring.
OUTLIER_RECIPE: dict[str, Any] = {"log2_k": 3, "counts": {"norm": 4, "up": 16, "v": 16}, "calib_samples": 64}
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def outlier_record(src: str | Path = BUILTIN_DIR) -> dict[str, Any]:
    rec = builtin_info(src).get("outlier_variant")
    if not rec:
        raise VlmqError(f"{src} records no outlier variant", "use the shipped pipeline/builtin_model/ or re-run jobs/train_builtin.py")
    return rec


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_outlier_variant(dst: str | Path, src: str | Path = BUILTIN_DIR) -> Path:
    """Write the outlier variant of ``src`` to ``dst``: a complete model folder (fp16) whose fp
    outputs are bit-identical to ``src``'s; only its activation and weight statistics differ."""
    from transformers import LlavaForConditionalGeneration

    src, dst = Path(src), Path(dst)
    rec = outlier_record(src)
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float16)
    plant_outliers(model, rec["channels"], rec["log2_k"])
    tmp = dst.with_name(dst.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in _PROCESSOR_FILES:
        shutil.copy2(src / f, tmp / f)
    info = {
        "variant": "outlier",
        "made_from": str(src),
        "made_from_sha256": _sha256(src / "model.safetensors"),
        "log2_k": rec["log2_k"],
        "channels": rec["channels"],
        "measured": rec.get("results"),
        "note": "function-preserving rescaling of the built-in model (pipeline.models.builtin.plant_outliers)",
    }
    (tmp / "builtin_info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def builtin_outlier_dir(cache: str | Path | None = None) -> Path:
    """The outlier variant's folder, made once from the shipped model into a cache folder
    (``$VLMQ_CACHE`` or ``~/.cache/vlmq``) and re-made whenever the shipped weights change."""
    import os

    root = Path(cache or os.environ.get("VLMQ_CACHE") or Path.home() / ".cache" / "vlmq")
    dst = root / "builtin-outlier"
    want = _sha256(BUILTIN_DIR / "model.safetensors")
    if builtin_available(dst) and builtin_info(dst).get("made_from_sha256") == want:
        return dst
    root.mkdir(parents=True, exist_ok=True)
    return save_outlier_variant(dst, BUILTIN_DIR)
