"""Plain helpers of the evaluation tests (a uniquely named module; conftest imports it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.checkpoint.writer import write_checkpoint
from pipeline.models import detect_adapter
from pipeline.models.loading import layer_linear_names
from pipeline.models.tiny import tiny_image
from pipeline.models.weights import open_source
from pipeline.quant.quantizer import QuantScheme, quantize_weight


def write_rtn_checkpoint(model_dir: Path, out: Path, bits: int, group: int = 32) -> Path:
    """RTN of every decoder-layer Linear, written as a vlmq checkpoint (report.json names the fp model)."""
    source = open_source(model_dir)
    adapter = detect_adapter(source.config_dict)
    rels = set(layer_linear_names(adapter))
    prefix = adapter.layers_path + "."
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=False)
    qws = {}
    for k in source.keys():
        if k.startswith(prefix) and k.endswith(".weight"):
            mod = k[: -len(".weight")]
            if mod[len(prefix):].split(".", 1)[1] in rels:
                qws[mod] = quantize_weight(source.get(k).float(), scheme, scale_dtype=torch.float16)
    report = {"model": str(model_dir), "recipe_label": f"rtn W{bits} g{group}"}

    def hook(staging: Path) -> None:
        (staging / "report.json").write_text(json.dumps(report))

    recipe = {"method": "rtn", "wbits": bits, "group_size": group, "abits": 16, "sym": False,
              "label": f"rtn W{bits} g{group}"}
    return write_checkpoint(out, source, qws, recipe_info=recipe, stage_hook=hook)


def _save_image(d: Path, i: int) -> str:
    img_dir = d / "images"
    img_dir.mkdir(exist_ok=True)
    tiny_image(seed=100 + i, size=(28, 28)).save(img_dir / f"{i}.png")
    return f"images/{i}.png"


def make_vqa_file(path: Path, n: int) -> Path:
    """Open-ended VQA rows (also valid calibration rows: image + question + answer)."""
    rows = []
    for i in range(n):
        rows.append({"question_id": i, "image": _save_image(path.parent, i), "question": f"What is shown {i}?",
                     "answer": ["red", "a cat", "2"][i % 3], "category": ["colour", "object"][i % 2]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_mc_file(path: Path, n: int) -> Path:
    """ScienceQA-style rows; odd rows are text-only."""
    rows = []
    for i in range(n):
        r = {"id": f"q{i}", "question": f"Which one {i}?", "choices": ["red", "green", "blue"][: 2 + i % 2],
             "answer": i % 2, "subject": ["physics", "biology"][i % 2], "hint": "Look closely." if i % 3 == 0 else ""}
        if i % 2 == 0:
            r["image"] = _save_image(path.parent, 50 + i)
        rows.append(r)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


STRIP = ("seconds", "worker", "path", "traceback")


def comparable(doc: dict) -> list[dict]:
    """results.json rows without timing, worker ids and absolute paths."""
    return [{k: v for k, v in r.items() if k not in STRIP} for r in doc["rows"]]
