"""The synthetic visual-QA generator: deterministic, split-disjoint, and its text tells the truth
about its images (answers re-derived from the caption; colours read back from the pixels)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.data import synthetic as S
from pipeline.errors import VlmqError


def _fingerprint(samples):
    return [(s.image.tobytes(), s.question, s.answer, s.caption, s.skill, s.id) for s in samples]


def test_same_arguments_same_bytes_and_prefix_property():
    a = S.generate("test", 40, seed=3)
    b = S.generate("test", 40, seed=3)
    assert _fingerprint(a) == _fingerprint(b)
    longer = S.generate("test", 60, seed=3)
    assert _fingerprint(longer[:40]) == _fingerprint(a)
    assert _fingerprint(S.generate_range("test", 10, 30, seed=3)) == _fingerprint(a[10:30])
    for s in a:
        assert s.image.mode == "RGB" and s.image.size == (S.IMAGE_SIZE, S.IMAGE_SIZE)


def test_different_seeds_and_splits_differ():
    a = S.generate("train", 30, seed=0)
    b = S.generate("train", 30, seed=1)
    same = sum(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    assert same == 0
    assert len({s.id for s in a} | {s.id for s in b}) == 60


def test_splits_are_disjoint_in_layout_and_question():
    # caption + question determine the scene layout and the question completely
    keys = {sp: {(s.caption, s.question) for s in S.generate(sp, n, seed=0, render=False)} for sp, n in
            (("train", 2000), ("calib", 400), ("test", 800))}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["calib"]
    assert not keys["calib"] & keys["test"]
    # and across seeds of different splits too
    assert not keys["train"] & {(s.caption, s.question) for s in S.generate("test", 600, seed=5, render=False)}


def test_unknown_split_is_a_user_error():
    with pytest.raises(VlmqError):
        S.generate("validation", 3)


_OBJ = re.compile(r"an? (\w+) (?:(circle|square|triangle|cross)|digit (\d)) at the ([a-z ]+?)(?=,|\.$)")


def _parse_caption(caption: str):
    """(cell, colour, shape, digit) per object, read back from the caption text."""
    objs = []
    for colour, shape, digit, pos in _OBJ.findall(caption):
        objs.append((S.POSITIONS.index(pos), colour, shape or None, int(digit) if digit else None))
    return objs


def _expected_answer(question: str, objs) -> str | None:
    shapes = [o for o in objs if o[2]]
    digits = [o for o in objs if o[3] is not None]
    if question == "How many shapes are there?":
        return str(len(shapes))
    if question == "How many digits are there?":
        return str(len(digits))
    if question == "What number is written?":
        return "".join(str(d[3]) for d in sorted(digits))
    if question == "What is the sum of the digits?":
        return str(sum(d[3] for d in digits))
    m = re.fullmatch(r"How many (\w+) shapes are there\?", question)
    if m:
        return str(sum(o[1] == m.group(1) for o in shapes))
    m = re.fullmatch(r"How many (\w+) are there\?", question)
    if m:
        singular = {v: k for k, v in S.PLURALS.items()}[m.group(1)]
        return str(sum(o[2] == singular for o in shapes))
    m = re.fullmatch(r"What digit is at the ([a-z ]+)\?", question)
    if m:
        return str(next(d[3] for d in digits if d[0] == S.POSITIONS.index(m.group(1))))
    m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
    if m and m.group(1) != "digit":
        return S.POSITIONS[next(o[0] for o in shapes if (o[1], o[2]) == m.groups())]
    m = re.fullmatch(r"Is the (\w+) (\w+) (above|below|left of|right of) the (\w+) (\w+)\?", question)
    if m:
        a = next(o for o in shapes if (o[1], o[2]) == m.group(1, 2))
        b = next(o for o in shapes if (o[1], o[2]) == m.group(4, 5))
        ra, ca, rb, cb = a[0] // 3, a[0] % 3, b[0] // 3, b[0] % 3
        holds = {"above": ra < rb, "below": ra > rb, "left of": ca < cb, "right of": ca > cb}[m.group(3)]
        return "yes" if holds else "no"
    return None


def test_answers_follow_from_the_caption():
    checked = 0
    text_only = S.generate("test", 400, seed=0, render=False)
    assert [(s.question, s.caption) for s in text_only[:20]] == [(s.question, s.caption) for s in S.generate("test", 20)]
    for s in text_only:
        objs = _parse_caption(s.caption)
        assert len(objs) == sum(int(x) for x in re.findall(r"(\d+) (?:shape|digit)", s.caption.split(":")[0]))
        want = _expected_answer(s.question, objs)
        if want is not None:
            assert s.answer == want, (s.question, s.caption)
            checked += 1
    assert checked > 200


def test_pixels_show_the_named_colour_at_each_shape_centre():
    palette = {k: np.array(v, dtype=float) for k, v in S.COLOURS.items()}
    n = 0
    for s in S.generate("calib", 40, seed=0):
        img = np.asarray(s.image, dtype=float)
        for cell, colour, shape, _ in _parse_caption(s.caption):
            if not shape:
                continue
            r, c = divmod(cell, 3)
            px = img[r * S.CELL + S.CELL // 2, c * S.CELL + S.CELL // 2]
            nearest = min(palette, key=lambda k: np.abs(palette[k] - px).sum())
            assert nearest == colour, (s.id, cell, colour, px)
            n += 1
    assert n > 50


def test_skills_balanced_and_corpus_covers_the_text():
    xs = S.generate("train", 800, render=False)
    counts = {k: sum(s.skill == k for s in xs) for k in S.SKILLS}
    assert min(counts.values()) > 50
    corpus = " ".join(S.corpus_texts(500))
    for word in [*S.COLOURS, *S.PLURALS.values(), "ASSISTANT", "sum", "written"]:
        assert word in corpus
    assert not re.search(r"\d\d", corpus)  # digits spaced: BPE learns no multi-digit merges
