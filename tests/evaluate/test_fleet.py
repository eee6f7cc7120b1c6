"""The Ray evaluation fleet, end to end through the `vlmq eval` arguments: results do not depend on the
number of actors, a corrupt checkpoint fails only its own rows, and a re-run only does missing items."""

from __future__ import annotations

import json

import pytest

from eval_helpers import comparable
from pipeline.cli import build_parser
from pipeline.distributed.fleet import pick_item
from pipeline.evaluate.eval_cli import run_eval
from pipeline.evaluate.tasks.items import ITEMS_DIR


def _args(ckpts, task_files, out, workers, names=("fp", "w4", "w2", "broken")):
    argv = ["eval", *[str(ckpts[n]) for n in names], "--tasks", f"vqa:{task_files['vqa']}",
            f"mc:{task_files['mc']}", f"fidelity:{task_files['calib']}", "--limit", "4", "--shard-size", "2",
            "--workers", str(workers), "--out", str(out), "--quiet"]
    return build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def runs(ray_local, ckpts, task_files, tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    one = run_eval(_args(ckpts, task_files, base / "one", 1))
    three = run_eval(_args(ckpts, task_files, base / "three", 3))
    return {"one": (base / "one", one), "three": (base / "three", three)}


def _records(out):
    return {p.name: json.loads(p.read_text()).get("records") for p in sorted((out / ITEMS_DIR).glob("*.json"))}


def test_one_and_three_actors_agree(runs):
    (d1, one), (d3, three) = runs["one"], runs["three"]
    assert one["meta"]["workers"] == 1 and three["meta"]["workers"] == 3
    assert one["meta"]["items"] == 4 * 7  # 4 checkpoints x (vqa 2 + mc 2 + fidelity 2 + speed 1) shards
    assert comparable(one) == comparable(three)
    assert _records(d1) == _records(d3)  # every prediction, every per-token number
    by = {(r["checkpoint"], r["task"]): r for r in one["rows"]}
    assert by[("rtn-w4", "fidelity:calib.jsonl")]["metrics"]["answer"]["kl"] > 0
    assert by[("tiny-llava", "fidelity:calib.jsonl")]["metrics"]["answer"]["kl"] == 0.0
    assert by[("rtn-w4", "speed")]["metrics"]["decode_tokens_per_s"] == "n/a (no GPU)"


def test_corrupt_checkpoint_fails_only_its_rows(runs):
    _, doc = runs["three"]
    bad = [r for r in doc["rows"] if r["checkpoint"] == "rtn-w4-broken"]
    good = [r for r in doc["rows"] if r["checkpoint"] != "rtn-w4-broken"]
    assert len(bad) == 4 and all(r["status"] == "error" for r in bad)
    assert all("cannot load checkpoint" in r["error"] and "rtn-w4-broken" in r["error"] for r in bad)
    assert len(good) == 12 and all(r["status"] == "ok" for r in good), [r.get("error") for r in good]
    html = (runs["three"][0] / "report.html").read_text()
    assert "Errors" in html and "rtn-w4-broken" in html


def test_resume_runs_only_missing_items(runs, ckpts, task_files):
    out, before = runs["three"]
    names = ("fp", "w4", "w2")
    ok_w4 = sorted(p for p in (out / ITEMS_DIR).glob("*.json")
                   if json.loads(p.read_text())["checkpoint"] == "rtn-w4" and json.loads(p.read_text())["status"] == "ok")
    removed = ok_w4[:2]
    for p in removed:
        p.unlink()
    after = run_eval(_args(ckpts, task_files, out, 2, names))
    assert after["meta"]["items"] == 3 * 7
    assert after["meta"]["resumed_items"] == 3 * 7 - 2
    assert after["meta"]["executed_items"] == 2  # counted by the driver, and by the actors themselves:
    assert after["meta"]["actor_executed"] == sorted(p.stem for p in removed)
    assert all(p.exists() for p in removed)
    assert comparable(after) == [r for r in comparable(before) if r["checkpoint"] != "rtn-w4-broken"]


class _It:
    def __init__(self, path):
        self.ckpt = type("C", (), {"path": path})()


@pytest.mark.parametrize("pending,holding,busy,expected", [
    (["a", "a", "b"], "b", {}, 2),  # same checkpoint first
    (["a", "b", "b"], None, {"a": 1}, 1),  # then one no other worker is on
    (["a", "a"], None, {"a": 2}, 0),  # then anything
    (["a", "b"], "c", {"a": 1, "b": 1}, 0),
])
def test_pick_item(pending, holding, busy, expected):
    assert pick_item([_It(p) for p in pending], holding, busy) == expected
