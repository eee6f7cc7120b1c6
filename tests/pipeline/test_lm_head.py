"""``--quantize-lm-head``: the recipe option, its errors, and whole jobs whose checkpoint packs the
lm_head, checked against references computed another way (the quantizer applied directly to the
source weights, a float64 model)."""

import json

import pytest
import torch
from torch import nn

from pipeline.checkpoint.loader import iter_quantized, load_quantized_model
from pipeline.checkpoint.reference import read_reference
from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.cli import build_parser, main, spec_from_args
from pipeline.config import spec_from_dict
from pipeline.errors import VlmqError
from pipeline.models import detect_adapter
from pipeline.models.loading import build_model
from pipeline.models.weights import open_source
from pipeline.quant.quantizer import QuantScheme, fake_quantize


def _spec(model, out, **recipe):
    return spec_from_dict({
        "model": str(model), "out": str(out),
        "calib": {"source": "builtin", "num_samples": 4, "holdout": 2},
        "recipe": recipe, "resources": {"device": "cpu"},
    })


# -- the option and its errors (no model work) ----------------------------------------------


def test_flag_yaml_and_label(tmp_path):
    assert _spec("m", "o").recipe.quantize_lm_head is False  # opt-in
    ns = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--quantize-lm-head"])
    s = spec_from_args(ns)
    assert s.recipe.quantize_lm_head is True and s.recipe.label.endswith("+head")
    job = tmp_path / "job.yaml"
    job.write_text("model: m\nout: o\nrecipe:\n  quantize_lm_head: true\n")
    assert spec_from_args(build_parser().parse_args(["quantize", str(job)])).recipe.quantize_lm_head
    off = spec_from_args(build_parser().parse_args(["quantize", str(job), "--no-quantize-lm-head"]))
    assert off.recipe.quantize_lm_head is False and "+head" not in off.recipe.label
    with pytest.raises(VlmqError) as e:
        spec_from_dict({"model": "m", "out": "o", "recipe": {"quantize_lmhead": True}})
    assert "recipe.quantize_lm_head" in e.value.fix


@pytest.mark.parametrize("abits,method", [(8, "rtn"), (8, "smoothquant"), (6, "qvlm")])
def test_weight_only_refuses_quantized_activations(abits, method):
    with pytest.raises(VlmqError) as e:
        _spec("m", "o", method=method, wbits=4, abits=abits, quantize_lm_head=True)
    assert "--quantize-lm-head" in e.value.problem and f"--abits {abits}" in e.value.problem
    assert "drop --quantize-lm-head" in e.value.fix and "--abits 16" in e.value.fix


def test_cli_error_before_model_work_and_dry_run(tmp_path, capsys):
    # the model path does not exist: the recipe error must come first, before any model check
    rc = main(["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
               "--wbits", "4", "--abits", "8", "--quantize-lm-head", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "--quantize-lm-head" in err and "fix:" in err and "does not exist" not in err
    rc = main(["quantize", "--model", "builtin", "--out", str(tmp_path / "o"), "--quantize-lm-head", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "quantize_lm_head: true" in out
    assert not (tmp_path / "o").exists()


# -- whole jobs --------------------------------------------------------------------------------


def _reference_logits(source, adapter, qnames, scheme, inputs, head: bool | QuantScheme):
    """float64 logits of the source model with every quantized decoder Linear (and, with ``head``,
    the lm_head: ``True`` in ``scheme``, or a scheme of its own) replaced by the quantizer's
    fake-quant of its fp weight, applied directly."""
    model = build_model(source, adapter, dtype=torch.float64)
    with torch.no_grad():
        for m in qnames:
            w = source.get(f"{m}.weight")
            model.get_submodule(m).weight.copy_(fake_quantize(w, scheme, torch.float16).double())
        if head is not False:  # untied here, so a tied head gets its own tensor, as in the checkpoint
            hs = scheme if head is True else head
            w = model.get_submodule(adapter.lm_head_path).weight.detach().float()
            model.get_submodule(adapter.lm_head_path).weight = nn.Parameter(
                fake_quantize(w, hs, torch.float16).double(), requires_grad=False)
        return [model(**{k: v.double() if v.is_floating_point() else v for k, v in x.items()}).logits[0]
                for x in inputs]


def _loaded_logits(ckpt, inputs, backend="fake"):
    model = load_quantized_model(ckpt, backend=backend, dtype=torch.float32)
    with torch.no_grad():
        return model, [model(**x, use_cache=False).logits[0] for x in inputs]


@pytest.mark.slow
def test_job_packs_the_lm_head(ray_local, tiny_dirs, tmp_path):
    """LLaVA, W4 g32 asymmetric, with and without --quantize-lm-head."""
    from pipeline.distributed.job import run_quantize
    from pipeline.distributed.progress import JobView

    model_dir = tiny_dirs["llava"]
    recipe = dict(method="rtn", wbits=4, group_size=32)
    scheme = QuantScheme(4, 32, False)
    with_head = run_quantize(_spec(model_dir, tmp_path / "head", quantize_lm_head=True, **recipe), JobView(quiet=True))
    fp_head = run_quantize(_spec(model_dir, tmp_path / "fp", **recipe), JobView(quiet=True))
    ckpt = with_head.out
    assert validate_checkpoint(ckpt).ok and with_head.report["validation"]["ok"]

    # on disk: packed in the layers' layout, out of ignore; the fp16-head checkpoint keeps it dense
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in q["ignore"] and "lm_head" in json.loads((fp_head.out / "config.json").read_text())[
        "quantization_config"]["ignore"]
    wmap = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k in wmap if k.startswith("lm_head.")} == {
        "lm_head.weight_packed", "lm_head.weight_scale", "lm_head.weight_shape", "lm_head.weight_zero_point"}
    source = open_source(model_dir)
    adapter = detect_adapter(source.config_dict)
    got = {m: qw for m, qw, _ in iter_quantized(ckpt)}
    assert got["lm_head"].scheme == scheme
    assert torch.equal(got["lm_head"].dequantize(torch.float32),
                       fake_quantize(source.get("lm_head.weight"), scheme, torch.float16).float())

    # the loaded model's logits: the float64 reference with the head fake-quantized, not the fp16 head's
    inputs = read_reference(ckpt).inputs
    decoder = [m for m in got if m != "lm_head"]
    ref_q = _reference_logits(source, adapter, decoder, scheme, inputs, head=True)
    ref_fp = _reference_logits(source, adapter, decoder, scheme, inputs, head=False)
    _, head_logits = _loaded_logits(ckpt, inputs)
    _, fp_logits = _loaded_logits(fp_head.out, inputs)
    for a, b, r_q, r_fp in zip(head_logits, fp_logits, ref_q, ref_fp):
        scale = r_q.abs().max().item()
        assert (a.double() - r_q).abs().max().item() < 1e-4 * scale
        assert (b.double() - r_fp).abs().max().item() < 1e-4 * scale
        assert (a - b).abs().max().item() > 100 * 1e-4 * scale  # the packed head shows in the logits

    # the report says so, and its fidelity reflects the packed head
    rep = json.loads((ckpt / "report.json").read_text())
    assert rep["lm_head"]["quantized"] is True and rep["lm_head"]["shape"] == [512, 128]
    assert 0 < rep["lm_head"]["rel_weight_error"] < 0.2 and rep["recipe_label"] == "rtn W4 g32 +head"
    assert json.loads((fp_head.out / "report.json").read_text())["lm_head"]["quantized"] is False
    assert rep["fidelity"]["text"]["kl"] != fp_head.report["fidelity"]["text"]["kl"]
    md = (ckpt / "report" / "report.md").read_text()
    assert "lm_head" in md and "quantized W4 g32 (RTN)" in md and "14 Linears in 2 layers + the lm_head" in md
    from pipeline.evaluate.summary import summary_rows

    rows = dict(summary_rows(with_head.report))
    assert rows["quantized"] == "14 Linears in 2 decoder layers + the lm_head"
    assert rows["lm_head"].startswith("quantized W4 g32 (RTN), 512x128")
    assert dict(summary_rows(fp_head.report))["lm_head"].startswith("16-bit, not quantized")
    assert json.loads((ckpt / "vlmq.json").read_text())["recipe"]["quantize_lm_head"] is True

    # vlmq's kernels (Triton interpreter on CPU) reproduce the fake path, the head a QuantLinear too
    tri, tri_logits = _loaded_logits(ckpt, inputs[:1], backend="triton")
    assert type(tri.lm_head).__name__ == "QuantLinear" and tri.lm_head.out_features == 512
    a = tri_logits[0]
    assert (a - head_logits[0]).abs().max().item() < 1e-2 * head_logits[0].abs().max().item()
    assert (a.argmax(-1) == head_logits[0].argmax(-1)).float().mean().item() > 0.95


@pytest.mark.slow
def test_tied_embeddings_are_untied(ray_local, tiny_dirs, tmp_path):
    """The tiny InternVL ties lm_head to embed_tokens: the checkpoint keeps the embeddings dense and
    bit-identical, packs the head from the same table, and says tie_word_embeddings: false."""
    from pipeline.distributed.job import run_quantize
    from pipeline.distributed.progress import JobView
    from pipeline.models.loading import lm_head_tied

    model_dir = tiny_dirs["internvl"]
    source = open_source(model_dir)
    adapter = detect_adapter(source.config_dict)
    assert lm_head_tied(source.config_dict, adapter) and "lm_head.weight" not in source.keys()
    scheme = QuantScheme(3, 32, True)
    res = run_quantize(_spec(model_dir, tmp_path / "out", method="rtn", wbits=3, group_size=32, sym=True,
                             quantize_lm_head=True), JobView(quiet=True))
    ckpt = res.out
    assert validate_checkpoint(ckpt).ok
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    assert not lm_head_tied({k: v for k, v in cfg.items() if k != "quantization_config"}, adapter)
    embed = source.get(f"{adapter.embed_path}.weight")
    head = {m: qw for m, qw, _ in iter_quantized(ckpt)}["lm_head"]
    assert torch.equal(head.dequantize(torch.float32), fake_quantize(embed, scheme, torch.float16).float())
    model = load_quantized_model(ckpt, dtype=torch.float32)
    assert torch.equal(model.get_input_embeddings().weight, embed.float())  # the embeddings stay dense
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    rep = json.loads((ckpt / "report.json").read_text())
    assert rep["lm_head"]["untied"] is True
    # the tied head counts once in "before", as the source stores it
    assert rep["sizes"]["before"] == sum(source.nbytes(k) for k in source.keys())


# -- the head's own precision (--lm-head-bits / --lm-head-group-size) ---------------------------


def test_head_precision_flags_yaml_and_label(tmp_path):
    ns = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--wbits", "3",
                                    "--lm-head-bits", "4", "--lm-head-group-size", "32"])
    r = spec_from_args(ns).recipe
    # the flags imply --quantize-lm-head; the label names the head's scheme when it differs
    assert r.quantize_lm_head and (r.head_bits, r.head_group_size) == (4, 32)
    assert r.label == "rtn W3 g128 +head W4 g32"
    job = tmp_path / "job.yaml"
    job.write_text("model: m\nout: o\nrecipe:\n  wbits: 3\n  sym: true\n  lm_head_group_size: channel\n")
    r = spec_from_args(build_parser().parse_args(["quantize", str(job)])).recipe
    assert r.quantize_lm_head and r.lm_head_group_size == 0 and r.head_group_size is None
    assert (r.head_bits, r.label) == (3, "rtn W3 g128 sym +head W3 ch")
    ns = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--lm-head-group-size", "channel"])
    assert spec_from_args(ns).recipe.lm_head_group_size == 0
    # the same scheme spelled out is the plain "+head"; no head flags: no head
    assert _spec("m", "o", wbits=4, group_size=64, lm_head_bits=4, lm_head_group_size=64).recipe.label \
        == "rtn W4 g64 +head"
    assert "+head" not in _spec("m", "o", wbits=3).recipe.label


@pytest.mark.parametrize("recipe,problem,fix", [
    (dict(lm_head_bits=5), "--lm-head-bits 5 is not supported", "2, 3, 4, 8"),
    (dict(lm_head_group_size=48), "--lm-head-group-size 48 is not supported", "'channel'"),
    (dict(lm_head_bits=4, quantize_lm_head=False), "--no-quantize-lm-head", "drop --no-quantize-lm-head"),
    (dict(wbits=4, abits=8, lm_head_bits=8), "--lm-head-bits 8 is weight-only", "drop --lm-head-bits 8"),
], ids=["bits", "group", "contradiction", "w4a8"])
def test_head_precision_errors(recipe, problem, fix):
    with pytest.raises(VlmqError) as e:
        _spec("m", "o", **recipe)
    assert problem in e.value.problem and fix in e.value.fix


def test_head_group_size_must_divide_the_hidden_size(tiny_dirs, tmp_path, capsys):
    """The tiny LLaVA-OneVision's hidden size is 64: --group-size 32 fits its layers, a head group
    of 128 does not; refused by --dry-run (no model work), naming the head and the flag."""
    args = ["quantize", "--model", str(tiny_dirs["llava_onevision"]), "--out", str(tmp_path / "o"),
            "--group-size", "32", "--dry-run"]
    assert main([*args, "--lm-head-group-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "group size 128 (--lm-head-group-size) does not divide in_features=64 of lm_head" in err
    assert "fix: pass --lm-head-group-size with a value that divides the hidden size 64" in err
    assert main([*args, "--lm-head-bits", "8", "--lm-head-group-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "lm_head_bits: 8" in out and "# lm_head: packed W8 g64 (RTN); decoder Linears W4 g32" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_job_with_its_own_head_scheme_and_resume(ray_local, tiny_dirs, tmp_path):
    """LLaVA, W3 g64 decoder Linears with a W4 g32 head: two schemes in the config, each module
    packed in its own, logits vs a float64 reference; then --resume with a W8 per-channel head
    redoes the head only (the blocks' part files are kept)."""
    from pipeline.distributed.context import JobContext
    from pipeline.distributed.job import run_quantize
    from pipeline.distributed.progress import JobView
    from pipeline.distributed.stages import head_part_path, quantize_head
    from pipeline.evaluate.summary import summary_rows

    model_dir = tiny_dirs["llava"]
    layers, head = QuantScheme(3, 64, False), QuantScheme(4, 32, False)
    recipe = dict(method="rtn", wbits=3, group_size=64)
    res = run_quantize(_spec(model_dir, tmp_path / "out", lm_head_bits=4, lm_head_group_size=32, **recipe),
                       JobView(quiet=True))
    ckpt = res.out
    assert res.report["validation"]["ok"] and validate_checkpoint(ckpt).ok

    # config: one group per scheme, the head's by its exact name
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    groups = {tuple(g["targets"]): g["weights"] for g in q["config_groups"].values()}
    assert len(groups) == 2 and "lm_head" not in q["ignore"]
    hw = groups[("lm_head",)]
    assert (hw["num_bits"], hw["group_size"], hw["strategy"], hw["symmetric"]) == (4, 32, "group", False)
    (dec_targets, dw), = [(t, w) for t, w in groups.items() if t != ("lm_head",)]
    assert len(dec_targets) == 14 and (dw["num_bits"], dw["group_size"]) == (3, 64)

    # tensors: the head's 4-bit codes (128 in / 8 per int32 word; 512 x 4 groups of scales) equal
    # the quantizer applied to the source weight in the head's scheme; the decoder Linears are 3-bit
    source = open_source(model_dir)
    adapter = detect_adapter(source.config_dict)
    got = {m: qw for m, qw, _ in iter_quantized(ckpt)}
    assert got["lm_head"].scheme == head
    assert int(got["lm_head"].qweight.max()) > 7  # uses the 4-bit range: not a 3-bit head
    assert torch.equal(got["lm_head"].dequantize(torch.float32),
                       fake_quantize(source.get("lm_head.weight"), head, torch.float16).float())
    from safetensors import safe_open

    wmap = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(ckpt / wmap["lm_head.weight_packed"]), "pt") as f:
        assert f.get_slice("lm_head.weight_packed").get_shape() == [512, 16]
        assert f.get_slice("lm_head.weight_scale").get_shape() == [512, 4]
    decoder = [m for m in got if m != "lm_head"]
    assert len(decoder) == 14 and all(got[m].scheme == layers for m in decoder)
    m0 = decoder[0]
    assert torch.equal(got[m0].dequantize(torch.float32),
                       fake_quantize(source.get(f"{m0}.weight"), layers, torch.float16).float())

    # logits of the loaded model: the float64 reference with the head in its own scheme, and not
    # the one with the head in the layers' scheme
    inputs = read_reference(ckpt).inputs
    ref = _reference_logits(source, adapter, decoder, layers, inputs, head=head)
    ref_same = _reference_logits(source, adapter, decoder, layers, inputs[:1], head=True)
    _, logits = _loaded_logits(ckpt, inputs)
    for a, r in zip(logits, ref):
        assert (a.double() - r).abs().max().item() < 1e-4 * r.abs().max().item()
    assert (logits[0].double() - ref_same[0]).abs().max().item() > 100 * 1e-4 * ref[0].abs().max().item()
    tri, tri_logits = _loaded_logits(ckpt, inputs[:1], backend="triton")
    assert type(tri.lm_head).__name__ == "QuantLinear"
    assert (tri_logits[0] - logits[0]).abs().max().item() < 1e-2 * logits[0].abs().max().item()

    # the label, the summary and the report say the head's scheme
    rep = json.loads((ckpt / "report.json").read_text())
    assert rep["recipe_label"] == "rtn W3 g64 +head W4 g32"
    assert rep["lm_head"]["scheme"] == {"bits": 4, "group_size": 32, "symmetric": False}
    assert dict(summary_rows(res.report))["lm_head"].startswith("quantized W4 g32 (RTN), 512x128")
    assert "quantized W4 g32 (RTN)" in (ckpt / "report" / "report.md").read_text()
    assert json.loads((ckpt / "vlmq.json").read_text())["quantized_linears"] == {"w3g64asym": 14, "w4g32asym": 1}

    # --resume with another head scheme: the blocks are kept, the head is redone in the new one
    parts = sorted((tmp_path / "out.work" / "parts").glob("block_*.safetensors"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    w8 = QuantScheme(8, None, False)
    spec = _spec(model_dir, tmp_path / "out", lm_head_bits=8, lm_head_group_size="channel", **recipe)
    spec.resume = True
    again = run_quantize(spec, JobView(quiet=True))
    assert again.report["validation"]["ok"] and sorted(again.report["resumed_blocks"]) == [0, 1]
    assert {p.name: p.stat().st_mtime_ns for p in parts} == mtimes, "a block was recomputed"
    assert "resumed" not in again.report["lm_head"] and again.report["recipe_label"] == "rtn W3 g64 +head W8 ch"
    got = {m: qw for m, qw, _ in iter_quantized(again.out)}
    assert got["lm_head"].scheme == w8 and got[m0].scheme == layers
    assert torch.equal(got["lm_head"].dequantize(torch.float32),
                       fake_quantize(source.get("lm_head.weight"), w8, torch.float16).float())

    # and a head part in the scheme asked for is reused as it is (no Ray task: ray_ctx None)
    ctx = JobContext(model=str(model_dir), family=adapter.family, recipe=spec.recipe,
                     work_dir=str(tmp_path / "out.work"), store_root="", compute_dtype="float32",
                     storage_dtype="float16")
    before = head_part_path(ctx).stat().st_mtime_ns
    assert quantize_head(ctx, None, JobView(quiet=True))["resumed"] is True
    assert head_part_path(ctx).stat().st_mtime_ns == before
