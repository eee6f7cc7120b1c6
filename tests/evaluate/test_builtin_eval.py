"""`vlmq eval builtin --tasks builtin-vqa`: the fleet's accuracy and per-skill numbers equal those of
`evaluate_builtin_vqa` run directly on the same samples, and results.json carries an `accuracy` field."""

from __future__ import annotations

import json

import pytest

from pipeline.models.builtin import builtin_available

N = 12


@pytest.mark.skipif(not builtin_available(), reason="built-in model not present")
def test_eval_builtin_matches_direct_evaluation(ray_local, tmp_path):
    from pipeline.cli import main
    from pipeline.evaluate.vqa import evaluate_builtin_vqa
    from pipeline.models.builtin import load_builtin

    out = tmp_path / "ev"
    rc = main(["eval", "builtin", "--tasks", "builtin-vqa", "--limit", str(N), "--shard-size", "5",
               "--out", str(out), "--quiet", "--no-speed"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    (row,) = doc["rows"]
    assert row["checkpoint"] == "builtin" and row["task"] == "builtin-vqa" and row["shards"] == 3
    model, proc = load_builtin()
    direct = evaluate_builtin_vqa(model, proc, n=N, seed=0)
    assert row["accuracy"] == pytest.approx(direct["accuracy"])
    assert row["per_skill"] == pytest.approx(direct["per_skill"])
    assert row["metrics"]["n"] == N
    assert (out / "report.md").read_text().count("builtin-vqa") >= 2


@pytest.mark.skipif(not builtin_available(), reason="built-in model not present")
def test_open_vqa_file_agrees_with_builtin_vqa(tmp_path):
    """The built-in test split exported as a `vqa:` Parquet file scores every example as builtin-vqa
    does: the open-ended task (batch-1 greedy, VQAv2 normalization) against the built-in scorer."""
    from pipeline.evaluate.tasks import parse_task
    from pipeline.evaluate.tasks.checkpoints import ModelCache, resolve_checkpoint
    from pipeline.evaluate.tasks.export import export_builtin_vqa
    from pipeline.evaluate.tasks.items import build_matrix, run_item

    f = export_builtin_vqa(tmp_path / "bvqa.parquet", n=N)
    tasks = [parse_task("builtin-vqa", N), parse_task(f"vqa:{f}", N)]
    cache = ModelCache()
    out = {}
    for it in build_matrix([resolve_checkpoint("builtin")], tasks):
        r = run_item(it, cache)
        assert r["status"] == "ok", r.get("error")
        out.setdefault(it.task.kind, []).extend(r["records"])
    bv = {r["id"]: r for r in out["builtin-vqa"]}
    ov = {r["id"]: r for r in out["vqa"]}
    assert set(bv) == set(ov) and len(ov) == N
    for k in bv:
        assert ov[k]["correct"] == bv[k]["correct"], (k, ov[k], bv[k])
    m = tasks[1].aggregate(out["vqa"])
    assert m["per_group"] == pytest.approx(tasks[0].aggregate(out["builtin-vqa"])["per_skill"])
