"""Calibration sources: schema handling, per-row reasons, seeded sampling, errors before model work."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import sources as S
from pipeline.errors import VlmqError

from calib_fixtures import make_records, png, rand_image, write_datasets, write_jsonl, write_parquet


def _pixels(img):
    return np.asarray(img)


def _same_rows(a, b):
    assert [r.id for r in a] == [r.id for r in b]
    for x, y in zip(a, b):
        assert (x.prompt, x.answer, x.reason) == (y.prompt, y.answer, y.reason)
        assert np.array_equal(_pixels(x.image), _pixels(y.image))


@pytest.fixture
def three_formats(tmp_path):
    recs = make_records(seed=random.randrange(10**6), n=11)
    pq_path = write_parquet(recs, tmp_path / "c.parquet")
    jl_path = write_jsonl(recs, tmp_path / "c.jsonl", tmp_path / "imgs")
    ds_path = write_datasets(recs, tmp_path / "ds")
    return recs, pq_path, jl_path, ds_path


def test_formats_yield_identical_rows_in_seeded_order(three_formats):
    recs, *paths = three_formats
    per_format = [list(S.open_calib_source(str(p), seed=7).rows()) for p in paths]
    for rows in per_format[1:]:
        _same_rows(per_format[0], rows)
    rows = per_format[0]
    # the order is numpy's seeded permutation, and each row carries its own record's content
    assert [r.id for r in rows] == list(np.random.default_rng(7).permutation(len(recs)))
    for r in rows:
        assert r.reason is None and r.image.mode == "RGB"
        assert (r.prompt, r.answer) == (recs[r.id]["prompt"], recs[r.id]["answer"])
        assert r.image.size == S.Image.open(__import__("io").BytesIO(recs[r.id]["image"])).size


def test_sampling_is_deterministic_and_seed_dependent(three_formats):
    _, pq_path, *_ = three_formats
    ids = lambda seed: [r.id for r in S.open_calib_source(str(pq_path), seed=seed).rows()]  # noqa: E731
    assert ids(42) == ids(42)
    assert sorted(ids(42)) == list(range(11))
    assert ids(42) != ids(43)
    assert S.open_calib_source(str(pq_path)).seed == 42  # the paper's seed by default


def test_file_uri_and_calibspec_object(three_formats, tmp_path):
    _, pq_path, jl_path, _ = three_formats
    a = list(S.open_calib_source(f"file://{pq_path}", seed=3).rows())
    spec = SimpleNamespace(source=str(jl_path), num_samples=5, seed=3, mode="caption", image_dir=str(tmp_path))
    src = S.open_calib_source(spec)
    assert src.num_samples == 5 and src.seed == 3
    _same_rows(a, list(src.rows()))


def test_reasons_for_unusable_rows(tmp_path):
    rng = random.Random(random.randrange(10**6))
    good = png(rand_image(rng))
    (tmp_path / "ok.png").write_bytes(good)
    lines = [
        {"image": "ok.png", "question": "Is it red? <image>", "answer": "  Yes. "},
        {"image": "missing.png", "question": "q", "answer": "a"},
        {"image": "ok.png", "question": "   ", "answer": "a"},
        {"image": "ok.png", "question": "q", "answer": ""},
        {"image": None, "question": "q", "answer": "a"},
    ]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(50)))
    lines.append({"image_path": "bad.png", "question": "q", "answer": "a"})
    text = "\n".join(json.dumps(x) for x in lines) + "\n\n{not json\n"
    (tmp_path / "c.jsonl").write_text(text)
    rows = {r.id: r for r in S.open_calib_source(str(tmp_path / "c.jsonl")).rows()}
    assert [rows[i].reason for i in range(7)] == [
        None, S.R_IMAGE_FILE, S.R_EMPTY_PROMPT, S.R_EMPTY_ANSWER, S.R_NO_IMAGE, S.R_BAD_IMAGE, S.R_BAD_RECORD,
    ]
    assert (rows[0].prompt, rows[0].answer) == ("Is it red?", "Yes.")  # placeholder removed, stripped
    assert np.array_equal(_pixels(rows[0].image), _pixels(S.Image.open(tmp_path / "ok.png").convert("RGB")))


def test_caption_struct_and_conversation_schemas(tmp_path):
    rng = random.Random(random.randrange(10**6))
    imgs = [png(rand_image(rng)) for _ in range(2)]
    t = pa.table({"image": [{"bytes": b, "path": None} for b in imgs], "caption": ["A red circle.", "Two squares."]})
    pq.write_table(t, tmp_path / "cap.parquet")
    rows = sorted(S.open_calib_source(str(tmp_path / "cap.parquet")).rows(), key=lambda r: r.id)
    assert [(r.prompt, r.answer) for r in rows] == [(S.CAPTION_PROMPT, "A red circle."), (S.CAPTION_PROMPT, "Two squares.")]
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]
    (tmp_path / "a.png").write_bytes(imgs[0])
    (tmp_path / "conv.jsonl").write_text(json.dumps({"image": "a.png", "conversations": conv}) + "\n")
    (row,) = S.open_calib_source(str(tmp_path / "conv.jsonl")).rows()
    assert (row.prompt, row.answer, row.reason) == ("What is shown?", "A cat.", None)


@pytest.mark.parametrize("mode", ["caption", "qa", "mixed"])
def test_builtin_modes_follow_the_generator(mode):
    from pipeline.data.synthetic import generate

    seed = random.randrange(1000)
    ref = generate("calib", 4, seed)
    rows = list(S.open_calib_source(f"builtin:{mode}", num_samples=4, seed=seed).rows())
    assert [r.id for r in rows] == [0, 1, 2, 3]
    for r, s in zip(rows, ref):
        caption = mode == "caption" or (mode == "mixed" and r.id % 2 == 0)
        assert (r.prompt, r.answer) == ((S.CAPTION_PROMPT, s.caption) if caption else (s.question, s.answer))
        assert np.array_equal(_pixels(r.image), _pixels(s.image.convert("RGB")))


def test_errors_name_the_problem_and_fix(tmp_path):
    cases = {
        str(tmp_path / "nope.parquet"): "does not exist",
        "s3://bucket/x.parquet": "only local paths",
        "builtin:captoin": "did you mean 'caption'",
    }
    (tmp_path / "x.csv").write_text("a,b\n")
    cases[str(tmp_path / "x.csv")] = "unknown format"
    (tmp_path / "folder").mkdir()
    cases[str(tmp_path / "folder")] = "not a datasets folder"
    pq.write_table(pa.table({"prompt": ["p"], "answer": ["a"]}), tmp_path / "noimg.parquet")
    cases[str(tmp_path / "noimg.parquet")] = "no image column"
    pq.write_table(pa.table({"image": [b"x"], "prompt": ["p"]}), tmp_path / "noans.parquet")
    cases[str(tmp_path / "noans.parquet")] = "no answer/caption column"
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cases[str(tmp_path / "empty.jsonl")] = "has no rows"
    (tmp_path / "notparquet.parquet").write_bytes(b"garbage" * 10)
    cases[str(tmp_path / "notparquet.parquet")] = "cannot read"
    for spec, words in cases.items():
        with pytest.raises(VlmqError) as e:
            S.check_calib_source(spec)
        assert words in str(e.value), (spec, str(e.value))
        assert e.value.fix, spec
    with pytest.raises(VlmqError, match="positive integer"):
        S.check_calib_source("builtin", num_samples=0)


def test_datasetdict_split_choice(tmp_path):
    import datasets

    recs = make_records(random.randrange(10**6), 3)
    write_datasets(recs, tmp_path / "one")
    d = datasets.load_from_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"validation": d, "test": d.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(VlmqError, match="splits"):
        S.check_calib_source(str(tmp_path / "dd"))
    assert S.check_calib_source(str(tmp_path / "dd"), split="test").num_rows == 1
    with pytest.raises(VlmqError, match="validation"):
        S.check_calib_source(str(tmp_path / "dd"), split="valdation")
