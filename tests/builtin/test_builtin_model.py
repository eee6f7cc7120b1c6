"""The shipped built-in model: a normal transformers LLaVA folder that still answers as recorded,
loses measurably under RTN W3, and whose outlier variant computes exactly the same function."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.data import synthetic
from pipeline.evaluate.vqa import build_prompts, evaluate_builtin_vqa, teacher_forced_accuracy
from pipeline.models import builtin as B

SUBSET = 96  # first samples of the test split (seed 0)


@pytest.fixture(scope="module")
def loaded():
    assert B.builtin_available(), "pipeline/builtin_model/ must ship config, weights and processor files"
    return B.load_builtin()


@pytest.fixture(scope="module")
def subset():
    return synthetic.generate("test", SUBSET, 0)


@pytest.fixture(scope="module")
def forced(loaded, subset):
    """Teacher-forced inputs (prompt + reference answer + </s>) and the answer-token positions."""
    _, proc = loaded
    tok = proc.tokenizer
    ims = [s.image for s in subset]
    prompts = build_prompts(proc, [s.question for s in subset])
    p_len = proc(images=ims, text=prompts, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    enc = proc(images=ims, text=[p + " " + s.answer + tok.eos_token for p, s in zip(prompts, subset)],
               padding=True, padding_side="left", return_tensors="pt")
    T = enc["input_ids"].shape[1]
    n_ans = enc["attention_mask"].sum(1) - p_len
    target = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    for i, n in enumerate(n_ans.tolist()):
        target[i, T - n :] = True
    return enc, target


@torch.no_grad()
def _answer_stats(model, forced, ref_logp=None):
    """(exact-match accuracy, answer-token log-probs [N, T-1, V]) under teacher forcing; with
    ``ref_logp`` also the mean KL(ref || model) over the positions that predict answer tokens."""
    enc, target = forced
    logp = torch.log_softmax(model(**enc, use_cache=False).logits[:, :-1].double(), -1)
    ids, tgt = enc["input_ids"][:, 1:], target[:, 1:]
    acc = float(((logp.argmax(-1) == ids) | ~tgt).all(1).double().mean())
    if ref_logp is None:
        return acc, logp
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)[tgt]
    return acc, float(kl.mean())


def _rtn(model, bits):
    return B.rtn_fake_quant_(copy.deepcopy(model), bits, 128)


@pytest.fixture(scope="module")
def outlier(loaded):
    model, _ = loaded
    om = copy.deepcopy(model)
    rec = B.outlier_record()
    B.plant_outliers(om, rec["channels"], rec["log2_k"])
    return om


def test_folder_is_a_plain_transformers_llava(loaded):
    from transformers import AutoProcessor

    files = [p for p in B.BUILTIN_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= 8 * 2**20
    cfg = json.loads((B.BUILTIN_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["model_type"] == "llava"
    assert cfg["text_config"]["model_type"] in ("llama", "qwen2")
    assert cfg["text_config"]["hidden_size"] % 128 == 0 and cfg["text_config"]["intermediate_size"] % 128 == 0
    proc = AutoProcessor.from_pretrained(B.BUILTIN_DIR)
    assert type(proc).__name__ == "LlavaProcessor" and proc.chat_template
    ids = proc(images=[synthetic.generate("test", 1)[0].image], text=build_prompts(proc, ["How many shapes are there?"]),
               return_tensors="pt")["input_ids"][0]
    assert int((ids == cfg["image_token_index"]).sum()) == (synthetic.IMAGE_SIZE // B.PATCH_SIZE) ** 2


def test_processor_pixels_equal_the_fast_path(loaded, subset):
    _, proc = loaded
    ims = [s.image for s in subset[:16]]
    ref = proc.image_processor(images=ims, return_tensors="pt")["pixel_values"]
    assert torch.allclose(B.pixel_values(ims), ref, atol=1e-6, rtol=0)


def test_fp_accuracy_is_the_recorded_one_and_teacher_forcing_agrees(loaded, subset, forced):
    model, proc = loaded
    recorded = B.builtin_info()["plain"]["fp"]["accuracy"]
    greedy = evaluate_builtin_vqa(model, proc, SUBSET, samples=subset, batch_size=96)
    assert greedy["accuracy"] >= recorded - 0.05, (greedy, recorded)
    assert set(greedy["per_skill"]) == set(synthetic.SKILLS)
    # one forward pass, computed here independently of the evaluator, gives the same score
    tf_acc, _ = _answer_stats(model, forced)
    assert tf_acc == pytest.approx(greedy["accuracy"], abs=1e-9)
    assert teacher_forced_accuracy(model, proc, subset, batch_size=96)["per_skill"] == greedy["per_skill"]


def test_rtn_w3_is_measurably_worse(loaded, forced, outlier):
    model, _ = loaded
    acc_fp, ref = _answer_stats(model, forced)
    _, kl_w4 = _answer_stats(_rtn(model, 4), forced, ref)
    _, kl_w3 = _answer_stats(_rtn(model, 3), forced, ref)
    assert 0 < kl_w4 and 2 * kl_w4 < kl_w3  # plain model: W3 moves the answer distribution most
    # the outlier variant (the benchmark's discriminating model) loses clearly in accuracy
    o_fp, _ = _answer_stats(outlier, forced)
    o_w3, _ = _answer_stats(_rtn(outlier, 3), forced)
    assert o_fp == acc_fp
    assert o_w3 <= o_fp - 0.05, (o_fp, o_w3)
    recorded = B.outlier_record()["results"]["rtn_w3"]["accuracy"]
    assert abs(o_w3 - recorded) < 0.1, (o_w3, recorded)


def test_outlier_variant_computes_the_same_function(loaded, forced, outlier, tmp_path):
    model, _ = loaded
    enc = {k: v[:24] for k, v in forced[0].items()}
    with torch.no_grad():
        ref = model(**enc, use_cache=False).logits
        assert torch.equal(outlier(**enc, use_cache=False).logits, ref)
        dst = B.save_outlier_variant(tmp_path / "outlier")
        saved, _ = B.load_builtin(dst)
        assert torch.equal(saved(**enc, use_cache=False).logits, ref)
    rec = B.outlier_record()
    k = 2.0 ** rec["log2_k"]
    ch = rec["channels"]["0"]["norm"]
    w_plain = model.model.language_model.layers[0].input_layernorm.weight[ch]
    assert torch.equal(saved.model.language_model.layers[0].input_layernorm.weight[ch], w_plain * k)
    assert json.loads((dst / "builtin_info.json").read_text())["variant"] == "outlier"


def test_rtn_touches_exactly_the_decoder_linears(loaded):
    model, _ = loaded
    q = _rtn(model, 3)
    before, after = model.state_dict(), q.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {f"{name}.weight" for name in B.decoder_linears(model)}
    assert changed == expected
    w = q.model.language_model.layers[1].mlp.down_proj.weight.detach()
    groups = w.reshape(w.shape[0], -1, 128)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 128)[:64]) <= 2**3


def test_plant_outliers_is_exact_with_grouped_kv_heads():
    """A random LLaVA with GQA (2 kv heads, 4 query heads): every site, planted then undone."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(B.BUILTIN_DIR)
    size = B.BuiltinSize(text_hidden=128, text_intermediate=256, text_layers=2, text_kv_heads=2,
                         vision_hidden=64, vision_intermediate=128, vision_layers=1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(B.build_config(size, proc)).eval()
    xs = synthetic.generate("calib", 4)
    enc = proc(images=[s.image for s in xs], text=build_prompts(proc, [s.question for s in xs]), padding=True,
               return_tensors="pt")
    channels = {i: {"norm": [3, 77], "up": [5, 200], "v": [0, 40]} for i in range(2)}
    om = copy.deepcopy(model)
    B.plant_outliers(om, channels, 4)
    with torch.no_grad():
        assert torch.equal(om(**enc).logits, model(**enc).logits)
    o = om.model.language_model.layers[0].self_attn.o_proj.weight
    ref = model.model.language_model.layers[0].self_attn.o_proj.weight
    # v row 40 (kv head 1, dim 8) feeds o columns of query heads 2 and 3: 2*32+8 and 3*32+8
    assert torch.equal(o[:, [72, 104]] * 16, ref[:, [72, 104]]) and torch.equal(o[:, 40], ref[:, 40])
    B.plant_outliers(om, channels, -4)
    assert all(torch.equal(a, b) for a, b in zip(om.state_dict().values(), model.state_dict().values()))
