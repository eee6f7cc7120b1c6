"""Reports: numbers from hand-made job and eval documents land in report.md / report.html, plots are
real PNGs, and (where Chromium is installed) the HTML renders to a non-blank page."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest
from PIL import Image

from pipeline.evaluate import job_report
from pipeline.evaluate.report import _series, write_eval_report
from pipeline.evaluate.report_cli import write_job_report


def _group(before, after):
    return {"kind": "attn", "loss_rtn": before, "loss_final": after, "alpha": 0.5}


JOB = {
    "model": "/models/m", "family": "llava", "recipe_label": "mbq W3 g128",
    "sizes": {"before": 4 * 2**20, "after": 2**20}, "quantized_linears": 14, "quantized_layers": 2,
    "fidelity": {"answer": {"kl": 0.125, "top1": 0.75, "tokens": 8}, "text": {"kl": 0.5, "top1": 0.5, "tokens": 4}},
    "blocks": [
        {"block": 0, "layers": [0], "metrics": {"method": "mbq", "layers": {"0": {"qkv": _group(0.5, 0.25), "down": _group(2.0, 1.5)}}}},
        {"block": 1, "layers": [1], "metrics": {"method": "mbq", "layers": {"1": {"qkv": _group(0.75, 0.625), "down": _group(3.0, 1.0)}}}},
    ],
    "sensitivity": {"ratios": {"0": {"r_attn": 0.3, "r_mlp": 0.4}, "1": {"r_attn": 0.3, "r_mlp": 0.5}},
                    "unfloored": {"0": {"r_attn": 0.1, "r_mlp": 0.4}, "1": {"r_attn": 0.3, "r_mlp": 0.5}},
                    "floor": "median"},
    "partition": {"scores": [2.0, 3.5, 1.0, 4.0], "blocks": [[0, 1], [2, 3]], "tau": 2.5, "mode": "entropy"},
    "stages_s": {"check": 1.5, "capture + search": 30.25},
}


def _png_ok(path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150
        assert len(im.convert("RGB").getcolors(1 << 24)) > 20  # something was drawn


def test_job_report_extracts_and_writes_numbers(tmp_path):
    errs = job_report.layer_errors(JOB)
    assert list(errs) == ["qkv", "down"]
    assert errs["down"] == {0: (2.0, 1.5), 1: (3.0, 1.0)}
    r = job_report.mbq_ratios(JOB)
    assert r["floored"]["r_attn"] == [0.3, 0.3] and r["unfloored"]["r_attn"] == [0.1, 0.3]
    files = write_job_report(JOB, tmp_path / "rep")
    names = sorted(p.name for p in files)
    assert names == ["layer_errors.png", "mbq_ratios.png", "qvlm_partition.png", "report.html", "report.md", "stages.png"]
    md = (tmp_path / "rep" / "report.md").read_text()
    for s in ("0.5 -> 0.25", "3 -> 1", "4.00 MiB -> 1.00 MiB (4.00x smaller)", "| 0 | 0.3 | 0.1 | 0.4 | 0.4 |",
              "| answer | 0.125 | 75.0 | 8 |", "| tokens of | KL(fp\\|\\|quant) |", "blocks: 0-1 | 2-3; tau 2.5", "| capture + search | 30.2 |"):
        assert s in md, s
    for p in files:
        if p.suffix == ".png":
            _png_ok(p)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4


def test_job_report_floor_none_and_qvlm_blocks(tmp_path):
    rep = {"sensitivity": {**JOB["sensitivity"], "floor": "none"},
           "blocks": [{"block": 0, "layers": [0, 1], "metrics": {"error_rtn": 4.0, "error_start": 4.0, "error_final": 1.0}},
                      {"block": 1, "layers": [2], "metrics": {"error_rtn": 2.0, "error_start": 2.0, "error_final": 1.5}}]}
    r = job_report.mbq_ratios(rep)
    assert r["floored"]["r_attn"] == [0.1, 0.3]  # with floor 'none' the ratios used are the unfloored ones
    assert job_report.block_errors(rep) == [([0, 1], 4.0, 1.0), ([2], 2.0, 1.5)]
    files = job_report.render(rep, tmp_path / "q")
    md = (tmp_path / "q" / "report.md").read_text()
    assert "| 0,1 | 4 | 1 | 75.0 |" in md and "block_errors.png" in {p.name for p in files}


def test_job_report_survives_an_empty_report(tmp_path):
    files = job_report.render({}, tmp_path / "e")
    assert [p.name for p in files] == ["report.md"]
    assert "RTN has nothing to search" in files[0].read_text()


def _row(ckpt, method, bits, acc, kind="quantized"):
    return {"checkpoint": ckpt, "task": "builtin-vqa", "kind": "builtin-vqa", "checkpoint_kind": kind,
            "method": method, "wbits": bits, "abits": 16, "group_size": None if bits == 16 else 128,
            "label": f"{method} W{bits}", "weight_bytes": 2**20,
            "status": "ok", "accuracy": acc, "per_skill": {"count": acc}, "shards": 1,
            "metrics": {"accuracy": acc, "per_skill": {"count": acc}, "n": 10},
            "headline": {"name": "accuracy", "value": acc}}


DOC = {
    "meta": {"backend": "fake", "items": 5, "resumed_items": 0, "executed_items": 5, "workers": 2, "date": "today"},
    "checkpoints": [{"name": n, "kind": k, "label": "fp" if b == 16 else f"{m} W{b}", "wbits": b, "weight_bytes": 2**20}
                    for n, k, m, b in [("builtin", "builtin", "fp", 16), ("r4", "quantized", "rtn", 4),
                                       ("r3", "quantized", "rtn", 3), ("m3", "quantized", "mbq", 3), ("bad", "quantized", "rtn", 2)]],
    "tasks": [{"name": "builtin-vqa", "kind": "builtin-vqa"}],
    "rows": [_row("builtin", "fp", 16, 0.97, "builtin"), _row("r4", "rtn", 4, 0.96), _row("r3", "rtn", 3, 0.85),
             _row("m3", "mbq", 3, 0.93),
             {"checkpoint": "bad", "task": "builtin-vqa", "kind": "builtin-vqa", "checkpoint_kind": "quantized",
              "method": "rtn", "wbits": 2, "status": "error", "error": "cannot load checkpoint bad: boom", "shards": 2,
              "failed_shards": 2}],
}


def test_eval_report_speed_columns(tmp_path):
    speed = {"checkpoint": "r4", "task": "speed", "kind": "speed", "checkpoint_kind": "quantized", "status": "ok",
             "label": "rtn W4", "weight_bytes": 2**20, "shards": 1, "headline": {"name": "decode tok/s (b1)", "value": 150.0},
             "metrics": {"weight_bytes": 2**20, "peak_gpu_mem_bytes": 3 * 2**20, "decode_tokens_per_s": 150.0, "device": "cuda:0"}}
    cpu = {**speed, "checkpoint": "r3", "metrics": {"weight_bytes": 2**20, "peak_gpu_mem_bytes": "n/a (no GPU)",
                                                  "decode_tokens_per_s": "n/a (no GPU)", "device": "cpu"}}
    doc = {**DOC, "tasks": DOC["tasks"] + [{"name": "speed", "kind": "speed"}], "rows": DOC["rows"] + [speed, cpu]}
    write_eval_report(doc, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| builtin-vqa (accuracy %) | peak GPU MiB | decode tok/s (b1) |" in md
    assert "| r4 | rtn W4 | 4 | 1.00 | 96.0 | 3.00 | 150 |" in md
    assert "| r3 | rtn W3 | 3 | 1.00 | 85.0 | n/a (no GPU) | n/a (no GPU) |" in md
    assert "| m3 | mbq W3 | 3 | 1.00 | 93.0 |  |  |" in md


def test_eval_report_tables_and_plot(tmp_path):
    by_base = _series([r for r in DOC["rows"] if r["status"] == "ok"], lambda r: r["accuracy"])
    assert by_base == {"model": ({"mbq": [(3, 0.93)], "rtn": [(3, 0.85), (4, 0.96)]}, [0.97])}
    other = [{**_row("o3", "rtn", 3, 0.5), "base": "outlier"}, {**_row("o3s", "rtn", 3, 0.6), "base": "outlier", "sym": True},
             {**_row("ofp", "fp", 16, 0.9, "fp"), "base": "outlier"}, {**_row("g64", "awq", 4, 0.7), "group_size": 64}]
    assert _series(other, lambda r: r["accuracy"]) == {
        "model": ({"awq g64": [(4, 0.7)]}, []), "outlier": ({"rtn": [(3, 0.5)], "rtn sym": [(3, 0.6)]}, [0.9])}
    files = write_eval_report(DOC, tmp_path)
    assert sorted(p.name for p in files) == ["accuracy_builtin-vqa.png", "report.html", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "| checkpoint | recipe | bits | weights MiB | builtin-vqa (accuracy %) |" in md
    assert "| r3 | rtn W3 | 3 | 1.00 | 85.0 |" in md
    assert "| builtin | fp | 16 | 1.00 | 97.0 |" in md
    assert "| bad | rtn W2 | 2 | 1.00 | FAILED |" in md
    assert "| bad | builtin-vqa | 2/2 | cannot load checkpoint bad: boom |" in md
    html = (tmp_path / "report.html").read_text()
    (b64,) = [s.split("'")[0] for s in html.split("data:image/png;base64,")[1:]]
    assert base64.b64decode(b64) == (tmp_path / "plots" / "accuracy_builtin-vqa.png").read_bytes()
    _png_ok(tmp_path / "plots" / "accuracy_builtin-vqa.png")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (CI has none)")
def test_html_renders_in_headless_chromium(tmp_path):
    write_eval_report(DOC, tmp_path / "ev")
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           (tmp_path / "ev" / "report.html").as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(1 << 24)
    assert len(colours) > 200  # text, table borders and the anti-aliased plot
    # the embedded plot's lines: matplotlib's C0 blue (31, 119, 180) is on the page
    assert any(r < 60 and 90 < g < 140 and b > 160 for _, (r, g, b) in colours)
