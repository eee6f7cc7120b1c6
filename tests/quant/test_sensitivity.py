"""The MBQ gradient pass against direct autograd on tiny VLMs; shard chaining; ratio flooring."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import ADAPTERS
from pipeline.models.layer_io import capture_layer_io
from pipeline.models.tiny import build_tiny_model, tiny_image
from pipeline.quant.sensitivity import (HeadLoss, answer_loss, merge_stats, model_sensitivity, range_sensitivity,
                                        ratios)


def _sample(family: str, processor, config, seed: int, n_answer: int):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The circle is red."}]}]
    text = processor.apply_chat_template(msgs)
    inputs = dict(processor(images=[tiny_image(seed, size=(40 + 4 * seed, 52))], text=[text], return_tensors="pt"))
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[0, -n_answer - 1:-1] = ids[0, -n_answer - 1:-1]
    vision = ADAPTERS[family].vision_mask(ids[0], config)
    assert vision.sum() > 0
    return inputs, labels, vision, labels[0] != -100


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny(request):
    family = request.param
    model, processor = build_tiny_model(family, seed=int(torch.randint(0, 1000, ())))
    a = ADAPTERS[family]
    layers = model.get_submodule(a.layers_path)
    data = [_sample(family, processor, model.config, seed, n) for seed, n in ((1, 5), (2, 3))]
    return family, model, layers, data


def _reference_ratios(model, layers, data):
    """Direct autograd: keep every o_proj/down_proj output, then torch.autograd.grad(loss, outputs)."""
    sums = {(i, p, k): 0.0 for i in range(len(layers)) for p in ("attn", "mlp") for k in ("vis", "ans")}
    for inputs, labels, vis, ans in data:
        outs = []
        hooks = [m.register_forward_hook(lambda mod, a, o: outs.append(o))
                 for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        with torch.enable_grad():
            logits = model(**inputs, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            grads = torch.autograd.grad(loss, outs)
        for h in hooks:
            h.remove()
        for j, g in enumerate(grads):
            i, p = divmod(j, 2)
            g = g[0].abs()
            sums[(i, "attn" if p == 0 else "mlp", "vis")] += float(g[vis].mean())
            sums[(i, "attn" if p == 0 else "mlp", "ans")] += float(g[ans].mean())
    return {i: {f"r_{p}": sums[(i, p, "vis")] / sums[(i, p, "ans")] for p in ("attn", "mlp")}
            for i in range(len(layers))}


def test_ratios_equal_direct_autograd_and_no_parameter_grads(tiny):
    family, model, layers, data = tiny
    fired = []
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    assert all(flags)  # a live model: the pass itself must keep parameters out of the graph
    hooks = [p.register_hook(lambda g: fired.append(1)) for p in params]
    stats = merge_stats(*(model_sensitivity(model, layers, inp, lab, vis, ans) for inp, lab, vis, ans in data))
    for h in hooks:
        h.remove()
    assert not fired and all(p.grad is None for p in params)
    assert [p.requires_grad for p in params] == flags  # restored
    got = ratios(stats, floor="none")
    want = _reference_ratios(model, layers, data)
    for i in want:
        for k in ("r_attn", "r_mlp"):
            assert got[i][k] == pytest.approx(want[i][k], rel=1e-5)
    assert stats[0]["attn_vis_n"] == len(data) == stats[1]["mlp_ans_n"]


def test_answer_loss_is_the_models_own_loss(tiny):
    _, model, _, data = tiny
    inputs, labels, _, _ = data[0]
    with torch.no_grad():
        out = model(**inputs, labels=labels, use_cache=False)
    assert float(answer_loss(out.logits, labels)) == pytest.approx(float(out.loss), rel=1e-6)


def test_chained_layer_ranges_equal_single_device(tiny):
    family, model, layers, data = tiny
    a = ADAPTERS[family]
    head = HeadLoss(model.get_submodule(a.final_norm_path), model.get_submodule(a.lm_head_path), data[0][1])
    for inputs, labels, vis, ans in data:
        single = model_sensitivity(model, layers, inputs, labels, vis, ans)
        ins, _, kw = capture_layer_io(model, layers, inputs)  # what the shards' capture pass records
        head.labels = labels
        g1, last = range_sensitivity(layers[1:], [1], ins[1][0], kw, vis, ans, loss_fn=head)
        g0, first = range_sensitivity(layers[:1], [0], ins[0][0], kw, vis, ans, grad_out=g1)
        chained = merge_stats(first, last)
        assert g0.shape == ins[0][0].shape and g0.abs().sum() > 0
        for i in (0, 1):
            for k, v in single[i].items():
                assert chained[i][k] == pytest.approx(v, rel=1e-5), (i, k)
    with pytest.raises(ValueError):
        range_sensitivity(layers[:1], [0], ins[0][0], kw, vis, ans)


def test_ratio_floor_median_by_hand():
    def layer(vis, ans):
        return {"attn_vis": vis, "attn_vis_n": 2.0, "attn_ans": ans, "attn_ans_n": 2.0,
                "mlp_vis": 2 * vis, "mlp_vis_n": 2.0, "mlp_ans": ans, "mlp_ans_n": 2.0}

    # per-layer r_attn = vis/ans: 0.5, 2, 1, 3 -> median 1.5; r_mlp doubles them -> median 3
    half = [{0: layer(0.5, 1.0)}, {1: layer(4.0, 2.0)}, {2: layer(1.0, 1.0)}, {3: layer(1.5, 0.5)}]
    stats = merge_stats(*half, *half)  # two "samples" each: means stay the same
    assert stats[1]["attn_vis_n"] == 4.0
    none = ratios(stats, "none")
    assert [none[i]["r_attn"] for i in range(4)] == pytest.approx([0.5, 2.0, 1.0, 3.0])
    med = ratios({str(k): v for k, v in stats.items()}, "median")  # JSON round-trip keys
    assert [med[i]["r_attn"] for i in range(4)] == pytest.approx([1.5, 2.0, 1.5, 3.0])
    assert [med[i]["r_mlp"] for i in range(4)] == pytest.approx([3.0, 4.0, 3.0, 6.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pass_matches_cpu(tiny):
    import copy

    _, model, layers, data = tiny
    cpu = merge_stats(*(model_sensitivity(model, layers, *d) for d in data))
    gm = copy.deepcopy(model).cuda()
    glayers = [m for m in gm.modules() if type(m) is type(layers[0])]
    cuda = lambda d: ({k: v.cuda() for k, v in d[0].items()}, *(t.cuda() for t in d[1:]))  # noqa: E731
    gpu = merge_stats(*(model_sensitivity(gm, glayers, *cuda(d)) for d in data))
    for i in cpu:
        for k, v in cpu[i].items():
            assert gpu[i][k] == pytest.approx(v, rel=1e-3), (i, k)
