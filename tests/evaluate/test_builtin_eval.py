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
