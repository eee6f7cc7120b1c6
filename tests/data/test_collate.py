"""Collation: answer-only labels, expanded vision masks, skip accounting, format equivalence, files."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from calib_fixtures import CROP, PATCH, make_records, png, rand_image, rand_text, write_datasets, write_jsonl, write_parquet

from pipeline.data import collate as C
from pipeline.data import sources as S
from pipeline.errors import VlmqError


def _rows(seed: int, n: int, echo_answer: bool = False) -> list[S.CalibRow]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        answer = rand_text(rng, 1, 6)
        prompt = rand_text(rng) + (f" Is it {answer}" if echo_answer and i % 2 == 0 else "")
        out.append(S.CalibRow(i, rand_image(rng), prompt, answer))
    return out


def _span(labels: np.ndarray) -> np.ndarray:
    return np.flatnonzero(labels != C.IGNORE_INDEX)


def test_labels_are_exactly_the_answer_tokens(processor):
    rows = _rows(random.randrange(10**6), 6, echo_answer=True)  # half the prompts contain the answer text
    table, report = C.build_calibration_table(rows, processor, processor.image_token_id, max_rows=10)
    tok = processor.tokenizer
    gen_marker = "ASSISTANT:" if "USER:" in table.column("text")[0].as_py() else "<|im_start|>assistant\n"
    for i, row in enumerate(rows):
        ids = np.asarray(table.column("input_ids")[i].as_py())
        labels = np.asarray(table.column("labels")[i].as_py())
        pos = _span(labels)
        assert len(pos) and np.array_equal(pos, np.arange(pos[0], pos[-1] + 1)), "one contiguous span"
        assert np.array_equal(labels[pos], ids[pos])
        assert tok.decode(ids[pos].tolist()).strip() == row.answer
        # the span starts right after the generation prompt and is followed only by the template's trailer
        assert tok.decode(ids[: pos[0]].tolist()).rstrip().endswith(gen_marker.strip())
        assert tok.decode(ids[pos[-1] + 1 :].tolist()).strip() in ("</s>", "<|im_end|>")
        assert pos[0] > np.flatnonzero(ids == processor.image_token_id).max()
    assert report.answer_tokens == sum(len(_span(np.asarray(x))) for x in table.column("labels").to_pylist())


def test_vision_mask_counts_the_expanded_image_tokens(llava_processor):
    rows = _rows(random.randrange(10**6), 4)
    table, report = C.build_calibration_table(rows, llava_processor, llava_processor.image_token_id, max_rows=4)
    per_image = (CROP // PATCH) ** 2  # the patch grid of the vision tower
    for i, row in enumerate(rows):
        vis = np.asarray(table.column("vision_mask")[i].as_py())
        assert vis.sum() == per_image
        inputs = C.row_to_model_inputs(table, i)
        assert inputs["input_ids"].shape == (1, len(vis)) and inputs["input_ids"].dtype == torch.int64
        assert torch.equal(inputs["input_ids"][0] == llava_processor.image_token_id, torch.from_numpy(vis))
        ref = llava_processor.image_processor(images=[row.image], return_tensors="pt")["pixel_values"]
        assert torch.equal(inputs["pixel_values"], ref)
        masks = C.row_masks(table, i)
        assert torch.equal(masks["vision_mask"], torch.from_numpy(vis))
        assert torch.equal(masks["answer_mask"], C.row_labels(table, i)[0] != -100)
    assert report.vision_tokens == 4 * per_image


def test_skipped_rows_are_counted_by_reason(tmp_path, llava_processor):
    seed = random.randrange(10**6)
    recs = make_records(seed, 6)
    recs[1]["image"] = png(rand_image(random.Random(seed)))[:40]  # truncated PNG: unreadable
    recs[4]["prompt"] = "  "
    src = S.open_calib_source(str(write_parquet(recs, tmp_path / "c.parquet")), seed=seed)
    table, report = C.build_calibration_table(src.rows(), llava_processor, llava_processor.image_token_id, max_rows=10)
    assert report.skipped == {S.R_BAD_IMAGE: 1, S.R_EMPTY_PROMPT: 1}
    assert (report.seen, report.usable, table.num_rows) == (6, 4, 4)
    assert sorted(table.column("sample_id").to_pylist()) == [0, 2, 3, 5]
    d = report.to_dict()
    assert d["skipped_total"] == 2 and d["examples"][S.R_BAD_IMAGE] == ["row 1"]
    # a bad row is replaced by the next one of the permutation: asking for 4 still gives 4
    t4, r4 = C.build_calibration_table(src, llava_processor, llava_processor.image_token_id, max_rows=4)
    assert t4.num_rows == 4 and r4.seen <= 6


def test_zero_usable_rows_is_an_error(tmp_path, llava_processor):
    rng = random.Random(random.randrange(10**6))
    recs = [{"image": bytes(rng.randrange(256) for _ in range(64)), "prompt": "p", "answer": "a"} for _ in range(3)]
    src = S.open_calib_source(str(write_parquet(recs, tmp_path / "bad.parquet")))
    with pytest.raises(VlmqError, match="no usable rows.*3 unreadable image") as e:
        C.build_calibration_table(src.rows(), llava_processor, 4, max_rows=3)
    assert e.value.fix


def test_parquet_jsonl_and_datasets_give_identical_tables(tmp_path, llava_processor):
    recs = make_records(random.randrange(10**6), 7)
    specs = [write_parquet(recs, tmp_path / "c.parquet"), write_jsonl(recs, tmp_path / "c.jsonl", tmp_path / "im"),
             write_datasets(recs, tmp_path / "ds")]
    tables = [
        C.build_calibration_table(S.open_calib_source(str(p), seed=5).rows(), llava_processor,
                                  llava_processor.image_token_id, max_rows=5)[0]
        for p in specs
    ]
    assert tables[0].num_rows == 5
    assert tables[0].column("sample_id").to_pylist() == list(np.random.default_rng(5).permutation(7)[:5])
    for t in tables[1:]:
        assert t.equals(tables[0], check_metadata=True)


def test_save_load_and_holdout(tmp_path, llava_processor):
    table, _ = C.build_calibration_table(_rows(random.randrange(10**6), 9), llava_processor,
                                         llava_processor.image_token_id, max_rows=9)
    C.save_table(table, tmp_path / "t.arrow")
    back = C.load_table(tmp_path / "t.arrow")
    assert back.equals(table, check_metadata=True)
    for k, v in C.row_to_model_inputs(table, 3).items():
        assert torch.equal(v, C.row_to_model_inputs(back, 3)[k])
    calib, hold = C.split_holdout(table, 3, seed=1)
    ids = table.column("sample_id").to_pylist()
    c_ids, h_ids = calib.column("sample_id").to_pylist(), hold.column("sample_id").to_pylist()
    assert len(h_ids) == 3 and sorted(c_ids + h_ids) == sorted(ids) and not set(c_ids) & set(h_ids)
    assert h_ids == sorted(np.asarray(ids)[np.random.default_rng(1).permutation(9)[:3]].tolist())
    assert C.split_holdout(table, 3, seed=1)[1].equals(hold)
    for bad in (-1, 9):
        with pytest.raises(VlmqError, match="hold out"):
            C.split_holdout(table, bad, seed=1)


def test_max_length_and_text_only_rows(llava_processor):
    rng = random.Random(random.randrange(10**6))
    long_row = S.CalibRow(0, rand_image(rng), " ".join(["red circle"] * 40), "Yes.")
    text_row = S.CalibRow(1, None, rand_text(rng), rand_text(rng))
    table, report = C.build_calibration_table([long_row, text_row], llava_processor, llava_processor.image_token_id,
                                              max_rows=2, max_length=60)
    assert report.skipped == {C.R_TOO_LONG: 1} and table.column("sample_id").to_pylist() == [1]
    assert not any(table.column("vision_mask")[0].as_py())
    inputs = C.row_to_model_inputs(table, 0)
    assert set(inputs) == {"input_ids", "attention_mask"}
    ids = inputs["input_ids"][0]
    assert llava_processor.tokenizer.decode(ids[C.row_labels(table, 0)[0] != -100]).strip() == text_row.answer


def test_wrong_vision_token_id_is_caught(llava_processor):
    with pytest.raises(VlmqError, match="vision_token_id"):
        C.build_calibration_table(_rows(1, 1), llava_processor, llava_processor.image_token_id + 1, max_rows=1)


# ------------------------------------------------------------------ every family's real processor

tiny = pytest.importorskip("pipeline.models.tiny")


def _expected_vision_tokens(family, processor, inputs, image) -> int:
    """Image tokens per family, from the image-processor outputs (not from input_ids)."""
    if family == "llava":
        return (28 // 7) ** 2  # patch grid; +1 CLS -1 for the "default" feature strategy
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    if family == "internvl":
        return inputs["pixel_values"].shape[0] * processor.image_seq_length
    h, w = image.size[1], image.size[0]  # llava_onevision: anyres tiles + newline tokens
    return int(processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0])


@pytest.mark.parametrize("family", tiny.TINY_FAMILIES)
def test_every_family_round_trips_into_the_model(family):
    from pipeline.models import ADAPTERS

    torch.manual_seed(0)
    model, processor = tiny.build_tiny_model(family)
    vid = ADAPTERS[family].image_token_id(model.config)
    rows = _rows(random.randrange(10**6), 2)
    table, _ = C.build_calibration_table(rows, processor, vid, max_rows=2)
    for i, row in enumerate(rows):
        inputs = C.row_to_model_inputs(table, i)
        vis = np.asarray(table.column("vision_mask")[i].as_py())
        assert vis.sum() == _expected_vision_tokens(family, processor, inputs, row.image)
        labels = C.row_labels(table, i)[0]
        assert processor.tokenizer.decode(inputs["input_ids"][0][labels != -100]).strip() == row.answer
        # the stored tensors reproduce the processor's own output, and so the model's logits
        conv = C.conversation(row)
        conv[0]["content"][0]["image"] = row.image  # the processor's own path: image inside the message
        direct = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
        assert set(direct) == set(inputs)
        for k in direct:
            assert torch.equal(torch.as_tensor(direct[k]).to(inputs[k].dtype), inputs[k]), k
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, model(**direct).logits)
