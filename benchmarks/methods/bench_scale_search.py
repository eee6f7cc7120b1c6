"""Per-layer output error of RTN / AWQ / MBQ / SmoothQuant, and the wall time of one layer's search.

A stack of Llama-style decoder layers with random weights and planted outlier channels (large
norm weights on a few channels, a few v_proj/up_proj rows scaled up, a few big channels in the
residual stream); synthetic samples: vision tokens first, then template text, the answer last.
The error of each method is measured on held-out samples (not the calibration ones), per layer,
with the layer's fp input: plain relative MSE over all tokens, and MBQ's modality-weighted
relative MAE (answer weight 1, vision weight r). W4A8 rows also fake-quantize every Linear's input
(per-token int8).

    .venv/bin/python benchmarks/methods/bench_scale_search.py                 # CPU, small shapes
    python benchmarks/methods/bench_scale_search.py --device cuda --dtype bfloat16 \\
        --hidden 4096 --inter 11008 --heads 32 --kv-heads 32 --layers 1 --samples 128 --tokens 512 \\
        --group 128 --only-time                                               # a 7B-shaped layer
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import transformers

from pipeline.models.base import LLAMA_LIKE_GROUPS
from pipeline.quant import SEARCHES
from pipeline.quant.apply import apply_fake_quant
from pipeline.quant.quantizer import QuantScheme, fake_quantize_activations
from pipeline.quant.types import BlockCalib, Sample, SearchSettings, layer_forward


def build_layers(a, dtype, device):
    cfg = transformers.LlamaConfig(hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                                   num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=64,
                                   max_position_embeddings=max(4096, 2 * a.tokens))
    cfg._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(a.seed)
    layers = []
    for i in range(a.layers):
        layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(cfg, layer_idx=i)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            k = max(2, a.hidden // 128)
            idx = torch.randperm(a.hidden, generator=g)[:k]
            layer.input_layernorm.weight[idx] *= 20
            layer.post_attention_layernorm.weight[idx] *= 20
            v = layer.self_attn.v_proj.weight
            v[torch.randperm(v.shape[0], generator=g)[:k]] *= 10
            u = layer.mlp.up_proj.weight
            u[torch.randperm(u.shape[0], generator=g)[:k]] *= 10
        layers.append(layer.to(device=device, dtype=dtype).eval())
    return cfg, layers


def make_samples(a, cfg, n, seed, dtype, device):
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).to(device)
    big = torch.randperm(a.hidden, generator=torch.Generator().manual_seed(0))[:4]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = a.tokens
        h = torch.randn(t, a.hidden, generator=g)
        h[:, big] *= 8
        nv, na = int(0.6 * t), max(1, int(0.15 * t))
        vis = torch.zeros(t, dtype=torch.bool)
        vis[2:2 + nv] = True
        h[vis, : a.hidden // 64] *= 4  # vision tokens carry their own large channels
        ans = torch.zeros(t, dtype=torch.bool)
        ans[t - na:] = True
        pos = torch.arange(t, device=device)[None]
        cos, sin = rope(torch.zeros(1, t, a.hidden, device=device), pos)
        kw = {"position_embeddings": (cos.to(dtype), sin.to(dtype)), "position_ids": pos, "attention_mask": None}
        out.append(Sample(h.to(device=device, dtype=dtype), kw, vis.to(device), ans.to(device)))
    return out


def quantized_layer(layer, res, abits):
    q = copy.deepcopy(layer)
    strip = lambda d: {k.split(".", 1)[1]: v for k, v in d.items()}  # noqa: E731
    apply_fake_quant(q, strip(res.quantized), strip(res.replaced))
    if abits < 16:
        for grp in LLAMA_LIKE_GROUPS:
            for n in grp.linears:
                q.get_submodule(n).register_forward_pre_hook(lambda m, x: (fake_quantize_activations(x[0], abits),))
    return q


@torch.no_grad()
def layer_errors(layer, q, smps, r):
    se = ref = wa = wref = 0.0
    for s in smps:
        y = layer_forward(layer, s.hidden, s.layer_kwargs).float()
        d = layer_forward(q, s.hidden, s.layer_kwargs).float() - y
        se += float(d.square().sum())
        ref += float(y.square().sum())
        w = s.answer_mask.float() + r * s.vision_mask.float()
        wa += float((d.abs().sum(-1) * w).sum())
        wref += float((y.abs().sum(-1) * w).sum())
    return se / ref, wa / wref


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--holdout", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--r-attn", type=float, default=0.3)
    p.add_argument("--r-mlp", type=float, default=0.2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-time", action="store_true", help="time the searches of layer 0, no error table")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    dev = torch.device(a.device)
    cfg, layers = build_layers(a, dtype, dev)
    calib = make_samples(a, cfg, a.samples, a.seed + 1, dtype, dev)
    held = make_samples(a, cfg, a.holdout, a.seed + 2, dtype, dev)
    sens = {i: {"r_attn": a.r_attn, "r_mlp": a.r_mlp} for i in range(a.layers)}
    wq = QuantScheme(a.wbits, a.group, False)
    w4a8 = QuantScheme(4, None, True)
    configs = [  # label, method, scheme, abits, options
        (f"RTN W{a.wbits} g{a.group}", "rtn", wq, 16, {}),
        (f"AWQ W{a.wbits} g{a.group} no clip", "awq", wq, 16, {"clip": False}),
        (f"AWQ W{a.wbits} g{a.group} clip", "awq", wq, 16, {"clip": True}),
        (f"MBQ W{a.wbits} g{a.group} no clip", "mbq", wq, 16, {"clip": False}),
        (f"MBQ W{a.wbits} g{a.group} clip", "mbq", wq, 16, {"clip": True}),
        (f"MBQ W{a.wbits} g{a.group} clip, unweighted clip", "mbq", wq, 16, {"clip": True, "mbq_clip_weighting": False}),
        ("RTN W4A8", "rtn", w4a8, 8, {}),
        ("SmoothQuant W4A8", "smoothquant", w4a8, 8, {}),
        ("AWQ W4A8 clip", "awq", w4a8, 8, {"clip": True}),
        ("MBQ W4A8 no clip", "mbq", w4a8, 8, {"clip": False}),
        ("MBQ W4A8 clip", "mbq", w4a8, 8, {"clip": True}),
    ]
    if a.only_time:
        configs = [c for c in configs if c[1] in ("awq", "mbq") and c[3] == 16 and c[4].get("clip")
                   and "unweighted" not in c[0]] + [configs[-1]]
    rows = []
    ins_c, ins_h = calib, held
    if dev.type == "cuda":  # warm up kernels and the allocator (not timed)
        st = SearchSettings(scheme=wq, groups=LLAMA_LIKE_GROUPS, scale_dtype=torch.float16, options={"grid": 2},
                            device=dev)
        SEARCHES["awq"]([layers[0]], [0], BlockCalib(calib[:2], sens), st)
    for li, layer in enumerate(layers[: 1 if a.only_time else None]):
        for label, method, scheme, abits, opts in configs:
            st = SearchSettings(scheme=scheme, groups=LLAMA_LIKE_GROUPS, scale_dtype=torch.float16, abits=abits,
                                options={"loss": "mae", "grid": 20, **opts}, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            res = SEARCHES[method]([layer], [li], BlockCalib(ins_c, sens), st)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row = {"layer": li, "config": label, "search_s": round(dt, 3),
                   "process_cpu_s": round(time.process_time() - c0, 3),
                   "phases_s": res.metrics["layers"][str(li)].get("time_s") if method != "rtn" else None}
            if dev.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if not a.only_time:
                r = (a.r_attn + a.r_mlp) / 2
                mse, wmae = layer_errors(layer, quantized_layer(layer, res, abits), ins_h, r)
                row.update({"rel_mse": mse, "mbq_weighted_rel_mae": wmae})
            rows.append(row)
            print(json.dumps(row), flush=True)
        with torch.no_grad():
            ins_c = [Sample(layer_forward(layer, s.hidden, s.layer_kwargs), s.layer_kwargs, s.vision_mask,
                            s.answer_mask) for s in ins_c]
            ins_h = [Sample(layer_forward(layer, s.hidden, s.layer_kwargs), s.layer_kwargs, s.vision_mask,
                            s.answer_mask) for s in ins_h]
    if not a.only_time:
        print("\n| layer | config | rel. MSE | MBQ-weighted rel. MAE | search s |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['config']} | {r['rel_mse']:.4g} | {r['mbq_weighted_rel_mae']:.4g} | "
                  f"{r['search_s']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
