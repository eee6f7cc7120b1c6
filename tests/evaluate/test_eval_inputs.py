"""User-input errors of `vlmq eval` / `vlmq report` are VlmqErrors raised before any Ray or model work,
and checkpoint arguments resolve to the right kind and recipe."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import build_parser, main
from pipeline.errors import VlmqError
from pipeline.evaluate.eval_cli import plan
from pipeline.evaluate.tasks import parse_task
from pipeline.evaluate.tasks.checkpoints import resolve_checkpoint


def _plan(*argv):
    return plan(build_parser().parse_args(["eval", *argv]))


@pytest.mark.parametrize("argv,needle", [
    (["builtin", "--tasks", "buitin-vqa", "--out", "x"], "did you mean 'builtin-vqa'"),
    (["/no/such/ckpt", "--tasks", "builtin-vqa", "--out", "x"], "does not exist"),
    (["builtin", "--tasks", "vqa", "--out", "x"], "needs a file"),
    (["builtin", "--tasks", "vqa:/no/file.jsonl", "--out", "x"], "does not exist"),
    (["builtin", "--tasks", "builtin-vqa:foo", "--out", "x"], "takes no source"),
    (["builtin", "--tasks", "builtin-vqa", "--limit", "0", "--out", "x"], "--limit"),
    (["builtin", "--tasks", "builtin-vqa", "--backend", "triton", "--out", "x"], "no CUDA GPU"),
    (["builtin", "--tasks", "caption-ppl", "--out", "x"], "calibration-format source"),
])
def test_bad_arguments(argv, needle, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VlmqError) as e:
        _plan(*argv)
    assert needle in str(e.value)


def test_file_without_needed_columns(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(VlmqError, match="unknown format"):
        parse_task(f"mc:{csv}")
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "what?", "image": "a.png"}) + "\n")
    with pytest.raises(VlmqError, match="answers / answer"):
        parse_task(f"vqa:{f}")
    f.write_text(json.dumps({"question": "what?", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(VlmqError, match="'answer'"):
        parse_task(f"mc:{f}")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(VlmqError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))


def test_cli_prints_problem_and_fix(capsys):
    assert main(["eval", "builtin", "--tasks", "nope", "--out", "/tmp/unused"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "fix:" in err
    assert main(["report", "/no/such/job"]) == 2


def test_checkpoint_kinds_and_recipes(ckpts):
    fp = resolve_checkpoint(str(ckpts["fp"]))
    assert (fp.kind, fp.method, fp.wbits, fp.reference) == ("fp", "fp", 16, str(ckpts["fp"].resolve()))
    w2 = resolve_checkpoint(str(ckpts["w2"]))
    assert (w2.kind, w2.method, w2.wbits, w2.group_size, w2.label) == ("quantized", "rtn", 2, 32, "rtn W2 g32")
    assert w2.weight_bytes == sum(p.stat().st_size for p in ckpts["w2"].glob("*.safetensors"))
    b = resolve_checkpoint("builtin")
    assert b.kind == "builtin" and b.wbits == 16



def test_fingerprint_changes_when_a_checkpoint_is_rewritten(ckpts, tmp_path):
    import os
    import shutil

    d = shutil.copytree(ckpts["w4"], tmp_path / "w4")
    before = resolve_checkpoint(str(d)).fingerprint
    assert resolve_checkpoint(str(d)).fingerprint == before
    shard = next(d.glob("model-*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, rewritten later
    assert resolve_checkpoint(str(d)).fingerprint != before
