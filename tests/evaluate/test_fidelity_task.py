"""The fidelity task: KL is exactly 0 for a checkpoint against an identical copy of itself, positive for
RTN W2 against its fp model, and equal to KL computed another way (torch's kl_div on the same logits)."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluate.tasks import parse_task
from pipeline.evaluate.tasks.checkpoints import ModelCache, resolve_checkpoint
from pipeline.evaluate.tasks.items import build_matrix, run_item


def _run(ckpt, task):
    cache = ModelCache()
    results = [run_item(it, cache) for it in build_matrix([ckpt], [task])]
    assert all(r["status"] == "ok" for r in results), [r.get("error") for r in results]
    return task.aggregate([rec for r in results for rec in r["records"]])


@pytest.fixture(scope="module")
def task(task_files):
    return parse_task(f"fidelity:{task_files['calib']}", limit=4, shard_size=3)  # 2 shards


def test_kl_zero_against_itself(ckpts, task):
    ref = resolve_checkpoint(str(ckpts["w4"]), fp_model=str(ckpts["w4copy"]))  # loaded twice, from two folders
    m = _run(ref, task)
    for mask in ("answer", "text"):
        assert m[mask]["tokens"] > 0
        assert m[mask]["kl"] == 0.0
        assert m[mask]["top1"] == 1.0
        assert m[mask]["ppl_fp"] == m[mask]["ppl_quant"]


def test_kl_positive_for_rtn_w2_and_matches_kl_div(ckpts, task):
    ref = resolve_checkpoint(str(ckpts["w2"]))  # fp model found through report.json
    assert ref.reference == str(ckpts["fp"].resolve())
    m = _run(ref, task)
    assert m["answer"]["kl"] > 1e-4 and m["text"]["kl"] > 1e-4
    w4 = _run(resolve_checkpoint(str(ckpts["w4"])), task)
    assert w4["answer"]["kl"] < m["answer"]["kl"]  # fewer bits, further from fp

    # the same number another way: load both models directly, F.kl_div over answer-predicting positions
    from pipeline.checkpoint.loader import load_quantized_model
    from pipeline.data.collate import build_calibration_table, row_masks, row_to_model_inputs
    from pipeline.data.sources import open_calib_source
    from pipeline.models import detect_adapter
    from pipeline.models.loading import build_model
    from pipeline.models.processors import load_processor
    from pipeline.models.weights import open_source

    src = open_source(ckpts["fp"])
    fp = build_model(src, detect_adapter(src.config_dict), dtype=torch.float32)
    q = load_quantized_model(ckpts["w2"], dtype=torch.float32)
    proc = load_processor(ckpts["fp"])
    table, _ = build_calibration_table(open_calib_source(task.source, num_samples=4, seed=42).rows(), proc,
                                       fp.config.image_token_index, max_rows=4)
    num, den = 0.0, 0
    with torch.no_grad():
        for r in range(table.num_rows):
            x = row_to_model_inputs(table, r)
            lf, lq = fp(**x).logits[0].double(), q(**x).logits[0].double()
            ans = row_masks(table, r)["answer_mask"]
            pos = torch.nonzero(ans).squeeze(1) - 1  # logits at t predict token t+1
            kl = torch.nn.functional.kl_div(torch.log_softmax(lq[pos], -1), torch.log_softmax(lf[pos], -1),
                                            log_target=True, reduction="none").sum(-1)
            num += float(kl.sum())
            den += len(pos)
    assert m["answer"]["tokens"] == den
    assert m["answer"]["kl"] == pytest.approx(num / den, rel=1e-6)


def test_missing_fp_model_fails_only_fidelity(ckpts, task, tmp_path):
    import json
    import shutil

    lone = shutil.copytree(ckpts["w4"], tmp_path / "lone")
    (lone / "report.json").write_text(json.dumps({"model": str(tmp_path / "gone")}))  # recorded model is absent
    from pipeline.checkpoint.writer import write_manifest

    write_manifest(lone)  # still a complete checkpoint
    ref = resolve_checkpoint(str(lone))
    assert ref.reference is None
    r = run_item(build_matrix([ref], [task])[0], ModelCache())
    assert r["status"] == "error" and r["stage"] == "reference"
    assert "--fp-model" in r["error"]
