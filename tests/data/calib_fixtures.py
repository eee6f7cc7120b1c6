"""Helpers of the data tests: random images and text, chat templates, sources written to disk."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image


PATCH = 7
CROP = 28  # -> (28 / 7)^2 = 16 image tokens per image

# Our own templates (not copied from any model): LLaVA-1.5-like and ChatML-like.
LLAVA_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CHATML_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "red green blue circle square triangle above below left right of the a is there how many what colour".split()


def rand_text(rng: random.Random, lo: int = 2, hi: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def rand_image(rng: random.Random) -> Image.Image:
    h, w = rng.randint(20, 70), rng.randint(20, 70)
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_records(seed: int, n: int) -> list[dict]:
    """Random (image bytes, prompt, answer) records; fresh per seed."""
    rng = random.Random(seed)
    return [{"image": png(rand_image(rng)), "prompt": rand_text(rng), "answer": rand_text(rng)} for _ in range(n)]


def write_parquet(records: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=max(1, len(records) // 3))
    return path


def write_jsonl(records: list[dict], path: Path, image_dir: Path) -> Path:
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, r in enumerate(records):
            rec = dict(r)
            if isinstance(r.get("image"), bytes):
                (image_dir / f"img_{i}.png").write_bytes(r["image"])
                rec["image"] = f"{image_dir.name}/img_{i}.png"
            f.write(json.dumps(rec) + "\n")
    return path


def write_datasets(records: list[dict], path: Path) -> Path:
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"), "answer": datasets.Value("string")})
    rows = {k: [r[k] if k != "image" else {"bytes": r[k], "path": None} for r in records] for k in ("image", "prompt", "answer")}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(path))
    return path
