"""Deterministic synthetic visual-QA scenes: the built-in model's training data and our benchmark.

Why our own generator: no dataset can be downloaded here, and quantization methods can only be
ranked on a model with real learned structure. A scene is a 3x3 grid (48x48 px) whose cells hold
coloured shapes or rendered digits; every question needs the image (colour, shape, counting to 9,
position, relations between two objects, reading single and multi-digit numbers, adding digits).

Determinism and disjoint splits, by construction:
- sample ``i`` of ``(split, seed)`` draws from its own ``random.Random`` seeded by a hash of
  ``(split, seed, i)``: same arguments give the same image bytes and text on any machine (the
  rasterizer and the digit font are ours, not a Pillow font), and ``generate(s, n)`` is a prefix
  of ``generate(s, n + k)``;
- each candidate (scene layout + question) is hashed into one of 20 buckets; a split keeps only
  candidates of its own buckets (test 2/20, calib 1/20, train 17/20) and redraws otherwise, so no
  (layout, question) pair appears in two splits.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 60, 200),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("above", "below", "left of", "right of")
SKILLS = ("colour", "shape", "count", "position", "relation", "ocr", "reading", "arithmetic")
SPLITS = ("train", "calib", "test")
_N_BUCKETS = 20
_SPLIT_BUCKETS = {"test": frozenset({0, 1}), "calib": frozenset({2}), "train": frozenset(range(3, _N_BUCKETS))}

# 3x5 digit font, one string per row ('#' = ink); drawn at 2x scale.
_FONT = {
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", "###", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", "..#", "..#", "..#"),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}


@dataclass(frozen=True)
class Obj:
    """One object in a grid cell: a shape (``shape`` set) or a digit (``digit`` set)."""

    cell: int  # 0..8, row-major
    colour: str
    shape: str | None = None
    digit: int | None = None

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    def phrase(self) -> str:
        return f"{self.colour} {self.shape}" if self.shape else f"digit {self.digit}"


@dataclass
class SceneSample:
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    question: str
    answer: str  # short: a word, a number, "yes"/"no", a position
    caption: str  # one sentence describing the scene (calibration text)
    skill: str
    id: str


# ---------------------------------------------------------------- scene + question construction


def _shape(rng: random.Random, cell: int, shapes=SHAPES, colours=tuple(COLOURS)) -> Obj:
    return Obj(cell, rng.choice(colours), shape=rng.choice(shapes))


def _digit(rng: random.Random, cell: int) -> Obj:
    return Obj(cell, rng.choice(tuple(COLOURS)), digit=rng.randrange(10))


def _scene(rng: random.Random, n_shapes: int, n_digits: int) -> list[Obj]:
    cells = rng.sample(range(GRID * GRID), n_shapes + n_digits)
    objs = [_shape(rng, c) for c in cells[:n_shapes]] + [_digit(rng, c) for c in cells[n_shapes:]]
    return sorted(objs, key=lambda o: o.cell)


def _shapes(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o.shape]


def _digits(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o.digit is not None]


def _unique_shapes(objs: list[Obj]) -> list[Obj]:
    """Shapes whose 'colour shape' phrase names exactly one object."""
    sh = _shapes(objs)
    return [o for o in sh if sum(p.phrase() == o.phrase() for p in sh) == 1]


def _q_colour(rng: random.Random):
    objs = _scene(rng, rng.randint(1, 6), rng.randint(0, 2))
    sh = _shapes(objs)
    kinds = [s for s in SHAPES if sum(o.shape == s for o in sh) == 1]
    if kinds and rng.random() < 0.5:
        kind = rng.choice(kinds)
        target = next(o for o in sh if o.shape == kind)
        return objs, f"What colour is the {kind}?", target.colour
    target = rng.choice(sh)
    return objs, f"What colour is the shape at the {POSITIONS[target.cell]}?", target.colour


def _q_shape(rng: random.Random):
    objs = _scene(rng, rng.randint(1, 6), rng.randint(0, 2))
    sh = _shapes(objs)
    cols = [c for c in COLOURS if sum(o.colour == c for o in sh) == 1]
    if cols and rng.random() < 0.5:
        col = rng.choice(cols)
        target = next(o for o in sh if o.colour == col)
        return objs, f"What shape is {col}?", target.shape
    target = rng.choice(sh)
    return objs, f"What shape is at the {POSITIONS[target.cell]}?", target.shape


def _q_count(rng: random.Random):
    kind = rng.randrange(4)
    if kind == 0:  # all shapes, 1..9
        c = rng.randint(1, 9)
        return _scene(rng, c, rng.randint(0, min(2, 9 - c))), "How many shapes are there?", str(c)
    if kind == 3:  # digits, 0..4
        c = rng.randint(0, 4)
        return _scene(rng, rng.randint(0 if c else 1, 9 - c - 2), c), "How many digits are there?", str(c)
    # one shape kind or one colour, 0..6 of them among other shapes
    c = rng.randint(0, 6)
    others = rng.randint(0 if c else 1, 9 - c)
    cells = rng.sample(range(GRID * GRID), c + others)
    if kind == 1:
        s = rng.choice(SHAPES)
        rest = tuple(x for x in SHAPES if x != s)
        objs = [Obj(cl, rng.choice(tuple(COLOURS)), shape=s) for cl in cells[:c]]
        objs += [_shape(rng, cl, shapes=rest) for cl in cells[c:]]
        q = f"How many {PLURALS[s]} are there?"
    else:
        col = rng.choice(tuple(COLOURS))
        rest = tuple(x for x in COLOURS if x != col)
        objs = [Obj(cl, col, shape=rng.choice(SHAPES)) for cl in cells[:c]]
        objs += [_shape(rng, cl, colours=rest) for cl in cells[c:]]
        q = f"How many {col} shapes are there?"
    return sorted(objs, key=lambda o: o.cell), q, str(c)


def _q_position(rng: random.Random):
    objs = _scene(rng, rng.randint(1, 6), rng.randint(0, 2))
    uniq = _unique_shapes(objs)
    dig = [o for o in _digits(objs) if sum(p.digit == o.digit for p in _digits(objs)) == 1]
    if dig and rng.random() < 0.3:
        t = rng.choice(dig)
        return objs, f"Where is the digit {t.digit}?", POSITIONS[t.cell]
    if not uniq:
        return None
    t = rng.choice(uniq)
    return objs, f"Where is the {t.phrase()}?", POSITIONS[t.cell]


def _relation_holds(a: Obj, b: Obj, rel: str) -> bool:
    return {
        "above": a.row < b.row,
        "below": a.row > b.row,
        "left of": a.col < b.col,
        "right of": a.col > b.col,
    }[rel]


def _q_relation(rng: random.Random):
    objs = _scene(rng, rng.randint(2, 6), rng.randint(0, 2))
    uniq = _unique_shapes(objs)
    if len(uniq) < 2:
        return None
    a, b = rng.sample(uniq, 2)
    want = rng.random() < 0.5
    rels = [r for r in RELATIONS if _relation_holds(a, b, r) == want]
    if not rels:
        return None
    rel = rng.choice(rels)
    return objs, f"Is the {a.phrase()} {rel} the {b.phrase()}?", "yes" if want else "no"


def _q_ocr(rng: random.Random):
    objs = _scene(rng, rng.randint(0, 5), rng.randint(1, 3))
    t = rng.choice(_digits(objs))
    return objs, f"What digit is at the {POSITIONS[t.cell]}?", str(t.digit)


def _q_reading(rng: random.Random):
    objs = _scene(rng, rng.randint(0, 3), rng.randint(2, 4))
    return objs, "What number is written?", "".join(str(o.digit) for o in _digits(objs))


def _q_arithmetic(rng: random.Random):
    objs = _scene(rng, rng.randint(0, 4), 2)
    return objs, "What is the sum of the digits?", str(sum(o.digit for o in _digits(objs)))


_BUILDERS = {
    "colour": _q_colour,
    "shape": _q_shape,
    "count": _q_count,
    "position": _q_position,
    "relation": _q_relation,
    "ocr": _q_ocr,
    "reading": _q_reading,
    "arithmetic": _q_arithmetic,
}


def caption(objs: list[Obj]) -> str:
    """One sentence naming every object (colour, shape or digit) and where it is, in reading order:
    with the question it determines the sample's layout key, so splits are disjoint in it too."""
    ns, nd = len(_shapes(objs)), len(_digits(objs))
    head = f"A picture with {ns} shape{'s' * (ns != 1)} and {nd} digit{'s' * (nd != 1)}"
    if not objs:
        return head + "."
    words = [o.phrase() if o.shape else f"{o.colour} digit {o.digit}" for o in objs]
    parts = [f"{_article(w)} {w} at the {POSITIONS[o.cell]}" for w, o in zip(words, objs)]
    return head + ": " + ", ".join(parts) + "."


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _bucket(objs: list[Obj], question: str) -> int:
    key = ";".join(f"{o.cell}{o.colour}{o.shape}{o.digit}" for o in objs) + "|" + question
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % _N_BUCKETS


def _rng(split: str, seed: int, i: int) -> random.Random:
    h = hashlib.sha256(f"vlmq-synthetic/{split}/{seed}/{i}".encode()).digest()
    return random.Random(int.from_bytes(h[:16], "little"))


# ---------------------------------------------------------------- rendering (our own rasterizer)

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up
        t = (dy + r) / (1.8 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    raise ValueError(shape)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 20) -> np.ndarray:
    return np.array([min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb], dtype=np.float32)


def render(objs: list[Obj], rng: random.Random) -> Image.Image:
    """Rasterize a scene: noisy dark background, jittered colours, sizes and offsets."""
    bg = rng.randint(10, 45)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), bg, dtype=np.float32)
    for o in objs:
        x0, y0 = o.col * CELL, o.row * CELL
        colour = _jitter(rng, COLOURS[o.colour])
        if o.shape:
            r = rng.uniform(4.0, 6.8)
            cx = x0 + CELL / 2 + rng.uniform(-1.0, 1.0)
            cy = y0 + CELL / 2 + rng.uniform(-1.0, 1.0)
            img[_shape_mask(o.shape, cx, cy, r)] = colour
        else:
            ox, oy = x0 + 5 + rng.randint(-1, 1), y0 + 3 + rng.randint(-1, 1)
            for ry, row in enumerate(_FONT[o.digit]):
                for rx, ch in enumerate(row):
                    if ch == "#":
                        img[oy + 2 * ry : oy + 2 * ry + 2, ox + 2 * rx : ox + 2 * rx + 2] = colour
    noise = np.random.default_rng(rng.getrandbits(63)).normal(0.0, 6.0, img.shape)
    return Image.fromarray(np.clip(np.rint(img + noise), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- public API


def _draw(split: str, seed: int, i: int, render_image: bool = True):
    rng = _rng(split, seed, i)
    buckets = _SPLIT_BUCKETS[split]
    skill = SKILLS[rng.randrange(len(SKILLS))]
    while True:
        got = _BUILDERS[skill](rng)
        if got is not None and _bucket(got[0], got[1]) in buckets:
            break
    objs, q, a = got
    image = render(objs, rng) if render_image else None
    return SceneSample(image, q, a, caption(objs), skill, f"{split}-{seed}-{i}")  # type: ignore[arg-type]


def generate(split: str, n: int, seed: int = 0, render: bool = True) -> list[SceneSample]:
    """``n`` samples of ``split`` ("train", "calib", "test"); deterministic in (split, n, seed).
    ``render=False`` leaves ``image`` None (text only, ~10x faster); the text is the same."""
    if split not in SPLITS:
        from ..errors import VlmqError

        raise VlmqError(f"unknown synthetic split {split!r}", f"use one of {', '.join(SPLITS)}")
    return [_draw(split, seed, i, render) for i in range(n)]


def generate_range(split: str, start: int, stop: int, seed: int = 0) -> list[SceneSample]:
    """Samples ``start..stop-1`` of a split: lets a trainer generate in parallel chunks."""
    return [_draw(split, seed, i) for i in range(start, stop)]


def corpus_texts(n: int = 4000) -> list[str]:
    """Every word the generator can produce, in questions, answers and captions (tokenizer training).

    Numbers appear digit by digit ("4 0 7 2"), so BPE learns no multi-digit merges and a number
    always tokenizes as one token per digit: reading and adding stay learnable."""
    texts = []
    for i in range(n):
        s = _draw("train", 1_000_003, i, render_image=False)
        texts += [f"USER: {s.question} ASSISTANT: {s.answer}", s.caption]
    texts += [" ".join(COLOURS), " ".join(SHAPES), " ".join(PLURALS.values()), " ".join(POSITIONS)]
    texts += [" ".join(str(k) for k in range(10)), "yes no"]
    return [_spaced_digits(t) for t in texts]


def _spaced_digits(text: str) -> str:
    out = []
    for ch in text:
        if ch.isdigit() and out and out[-1].isdigit():
            out.append(" ")
        out.append(ch)
    return "".join(out)
