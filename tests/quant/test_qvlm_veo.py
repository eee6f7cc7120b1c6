"""Q-VLM visual-encoder optimization on a tiny LLaVA: the objective's terms against closed forms,
and the tuning lowering its objective without touching either model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.models.builtin import rtn_fake_quant_
from pipeline.models.families import LLAVA
from pipeline.models.tiny import build_tiny_model
from pipeline.quant.entropy import soft_entropy
from pipeline.quant.veo import answer_kl, answer_positions, optimize_projector, projector_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    fp, _ = build_tiny_model("llava", seed=0)
    q = copy.deepcopy(fp)
    rtn_fake_quant_(q, 2, 32)
    img = fp.config.image_token_id
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(4):
        T = 40
        ids = torch.randint(10, 300, (1, T), generator=g)
        ids[0, 2:18] = img  # 28 px / patch 7 -> 16 image features
        labels = torch.full((1, T), -100)
        labels[0, 30:] = ids[0, 30:]
        inputs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "pixel_values": torch.randn(1, 3, 28, 28, generator=g), "labels": labels,
                       "vision_mask": ids[0] == img})
    return fp, q, inputs


def test_answer_kl_closed_form():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q_logits = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert float(answer_kl(p.log(), q_logits)) == pytest.approx(want, abs=1e-6)


def test_projector_parameter_sets(models):
    fp, _, _ = models
    affine = projector_parameters(fp, LLAVA.projector_path, "affine")
    assert sorted(affine) == ["model.multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_2.bias"]
    assert len(projector_parameters(fp, LLAVA.projector_path, "all")) == 4


def test_identical_models_have_zero_kl_and_the_entropy_of_the_vision_embeddings(models):
    fp, _, inputs = models
    _, log = optimize_projector(fp, fp, inputs[:2], LLAVA.projector_path, LLAVA.layers_path,
                                {"steps": 0, "eta": 0.5})
    assert log["before"]["kl"] == pytest.approx(0.0, abs=1e-6)
    ents = []
    with torch.no_grad():
        for inp in inputs[:2]:  # layer 0's input at vision positions = the projector's output
            emb = fp.model.get_image_features(pixel_values=inp["pixel_values"])
            emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
            emb = torch.cat(list(emb)) if isinstance(emb, (list, tuple)) else emb
            ents.append(float(soft_entropy(emb.reshape(-1, emb.shape[-1]), 64)))
    assert log["before"]["entropy"] == pytest.approx(sum(ents) / 2, rel=1e-5)
    assert log["before"]["objective"] == pytest.approx(0.5 * log["before"]["entropy"], rel=1e-6)


@pytest.mark.parametrize("eta,params", [(0.0, "affine"), (0.01, "all")])
def test_veo_lowers_its_objective_and_leaves_the_models_alone(models, eta, params):
    fp, q, inputs = models
    before = {k: v.clone() for k, v in q.state_dict().items()}
    new, log = optimize_projector(fp, q, inputs, LLAVA.projector_path, LLAVA.layers_path,
                                  {"steps": 25, "lr": 1e-3, "eta": eta, "params": params, "batch_size": 2})
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
    assert log["after"]["objective"] < 0.9 * log["before"]["objective"], log
    if eta == 0.0:
        assert log["after"]["kl"] < log["before"]["kl"]
    assert len(log["steps"]) == 25 and set(new) == set(log["params"])
    # the returned tensors, loaded into a copy, reproduce the logged "after" objective
    q2 = copy.deepcopy(q)
    sd = q2.state_dict()
    for k, v in new.items():
        sd[k].copy_(v)
    _, check = optimize_projector(fp, q2, inputs, LLAVA.projector_path, LLAVA.layers_path,
                                  {"steps": 0, "eta": eta, "params": params})
    assert check["before"]["objective"] == pytest.approx(log["after"]["objective"], rel=1e-5)


def test_precomputed_fp_logprobs_replace_the_fp_model(models):
    fp, q, inputs = models
    with_model = optimize_projector(fp, q, inputs, LLAVA.projector_path, LLAVA.layers_path, {"steps": 3, "lr": 1e-3})
    pre = []
    with torch.no_grad():
        for inp in inputs:
            model_in = {k: v for k, v in inp.items() if k not in ("labels", "vision_mask")}
            logits = fp(**model_in, use_cache=False).logits[0]
            pre.append({**inp, "fp_logprobs": torch.log_softmax(logits[answer_positions(inp)], -1)})
    assert int(answer_positions(inputs[0]).sum()) == 10  # labels at 30..39 -> predicted from 29..38
    without = optimize_projector(None, q, pre, LLAVA.projector_path, LLAVA.layers_path, {"steps": 3, "lr": 1e-3})
    assert without[1]["before"] == with_model[1]["before"] and without[1]["after"] == with_model[1]["after"]
