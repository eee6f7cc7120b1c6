"""Q-VLM block reconstruction vs RTN for block sizes 1, 2, 3 on a toy decoder with planted outliers.

A stack of L random-weight Llama decoder layers (transformers' own class), two residual channels
with a large mean (massive-activation-like outliers) and x20 norm weights on them, low-rank
correlated activations. For each block size k the stack is cut into blocks of k layers, every
block is searched on its fp inputs (as the pipeline does), and the whole quantized stack is run:

- per-block error (the search's own metric, calibration samples) RTN vs reconstruction,
- end-to-end stack output MSE vs fp, on the calibration samples and on held-out samples,
- search time per block and per layer.

    .venv/bin/python benchmarks/qvlm/bench_blocks.py [--layers 6 --hidden 128 --iters 200 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding  # noqa: E402

from pipeline.models.base import LLAMA_LIKE_GROUPS  # noqa: E402
from pipeline.quant.qvlm import run_block, search_qvlm  # noqa: E402
from pipeline.quant.quantizer import QuantScheme, fake_quantize_activations  # noqa: E402
from pipeline.quant.rtn import search_rtn  # noqa: E402
from pipeline.quant.types import BlockCalib, Sample, SearchSettings  # noqa: E402

OUTLIERS = (3, 17)


def make_stack(n_layers: int, hidden: int, n_samples: int, T: int, seed: int = 0, device: str = "cpu",
               dtype: torch.dtype = torch.float32, inter: int | None = None, heads: int | None = None,
               kv_heads: int | None = None):
    g = torch.Generator().manual_seed(seed)
    heads = heads or max(hidden // 32, 2)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter or 2 * hidden, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or max(heads // 2, 1),
                      vocab_size=64, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    layers = [LlamaDecoderLayer(cfg, i).eval() for i in range(n_layers)]
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * hidden**-0.5
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[list(OUTLIERS)] *= 20.0
    layers = [layer.to(device=device, dtype=dtype) for layer in layers]
    rope = LlamaRotaryEmbedding(cfg).to(device)
    mu = torch.randn(hidden, generator=g) * 0.5
    mu[list(OUTLIERS)] = torch.tensor([8.0, -6.0])
    mix = torch.randn(16, hidden, generator=g)
    samples = []
    for _ in range(n_samples):
        x = mu + 0.5 * torch.randn(T, 16, generator=g) @ mix + 0.2 * torch.randn(T, hidden, generator=g)
        pos = torch.arange(T, device=device)[None]
        cos, sin = rope(x[None].to(device), pos)
        vis = torch.zeros(T, dtype=torch.bool)
        vis[: T // 2] = True
        ans = torch.zeros(T, dtype=torch.bool)
        ans[3 * T // 4:] = True
        samples.append(Sample(x.to(device=device, dtype=dtype), {"position_embeddings": (cos.to(dtype), sin.to(dtype)),
                                                                  "position_ids": pos}, vis, ans))
    return layers, samples


@torch.no_grad()
def layer_inputs(layers, samples):
    """fp inputs of every layer: ``out[i]`` is the list of samples entering layer i."""
    out = [samples]
    for layer in layers[:-1]:
        out.append([Sample(run_block([layer], s.hidden, s.layer_kwargs), s.layer_kwargs, s.vision_mask, s.answer_mask)
                    for s in out[-1]])
    return out


@torch.no_grad()
def stack_mse(layers, quantized, samples, abits: int) -> float:
    """MSE of the whole quantized stack's output vs the fp stack (fake-quant weights)."""
    import copy

    q = copy.deepcopy(layers)
    for name, qw in quantized.items():
        i, rel = name.split(".", 1)
        lin = q[int(i)].get_submodule(rel)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype).to(lin.weight.device))
    hooks = []
    if abits < 16:
        for layer in q:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    hooks.append(m.register_forward_pre_hook(lambda _m, a: (fake_quantize_activations(a[0], abits),)))
    sq = n = 0.0
    for s in samples:
        d = run_block(q, s.hidden, s.layer_kwargs).float() - run_block(layers, s.hidden, s.layer_kwargs).float()
        sq += float(d.double().square().sum())
        n += d.numel()
    for h in hooks:
        h.remove()
    return sq / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inter", type=int, default=None, help="MLP width (default 2 x hidden)")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--no-stack", action="store_true", help="timing only: skip the stack evaluation")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--abits", type=int, default=16)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--round-lambda", type=float, default=1e4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sizes", default="1,2,3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    layers, all_samples = make_stack(args.layers, args.hidden, args.calib + args.heldout, args.tokens,
                                     device=args.device, dtype=dtype, inter=args.inter, heads=args.heads,
                                     kv_heads=args.kv_heads)
    cuda = args.device.startswith("cuda")
    calib, held = all_samples[: args.calib], all_samples[args.calib:]
    inputs = layer_inputs(layers, calib)
    st = SearchSettings(QuantScheme(args.bits, args.group), LLAMA_LIKE_GROUPS, torch.float16, abits=args.abits,
                        options=dict(iters=args.iters, lr=args.lr, round_lambda=args.round_lambda,
                                     batch_size=args.batch), device=args.device)
    ids = list(range(args.layers))
    rtn = search_rtn(layers, ids, None, st).quantized
    evaluate = (lambda q, smp: float("nan")) if args.no_stack else (lambda q, smp: stack_mse(layers, q, smp, args.abits))
    res = {"rtn": {"stack_mse_calib": evaluate(rtn, calib), "stack_mse_heldout": evaluate(rtn, held)}}
    for k in (int(s) for s in args.sizes.split(",")):
        quantized, blocks, t_total = {}, [], 0.0
        for start in range(0, args.layers, k):
            bl = ids[start: start + k]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            r = search_qvlm([layers[i] for i in bl], bl, BlockCalib(inputs[bl[0]]), st)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            extra_gb = (torch.cuda.max_memory_allocated() - base_mem) / 2**30 if cuda else float("nan")
            t_total += dt
            quantized.update(r.quantized)
            m = r.metrics
            blocks.append({"layers": bl, "error_rtn": m["error_start"], "error_after": m["error_after"],
                           "error_final": m["error_final"], "ratio": m["error_final"] / m["error_start"],
                           "fell_back": m["fell_back"], "flipped": m["flipped_fraction"], "gap": m["soft_hard_gap"],
                           "seconds": dt, "search_peak_extra_gib": extra_gb})
            print(f"k={k} block {bl}: {m['error_start']:.4g} -> {m['error_after']:.4g} "
                  f"({m['error_after'] / m['error_start']:.3f}{', fell back to RTN' if m['fell_back'] else ''}) "
                  f"{dt:.1f}s" + (f", peak +{extra_gb:.2f} GiB" if cuda else ""), flush=True)
        res[f"k{k}"] = {"blocks": blocks, "search_seconds": t_total, "seconds_per_layer": t_total / args.layers,
                        "stack_mse_calib": evaluate(quantized, calib), "stack_mse_heldout": evaluate(quantized, held)}
    out = {"args": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d"), "results": res}
    print(f"\nW{args.bits} g{args.group} A{args.abits}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.calib} calib + {args.heldout} held-out samples x {args.tokens} tokens, {args.iters} iters, "
          f"lr {args.lr}, lambda {args.round_lambda}, batch {args.batch}, {args.device} {args.dtype}")
    print("| blocks of | mean block err (final) / RTN | stack MSE calib (/RTN) | stack MSE held-out (/RTN) | search s | s/layer |")
    print("|---|---|---|---|---|---|")
    r0 = res["rtn"]
    print(f"| RTN | 1 | {r0['stack_mse_calib']:.4g} (1.00) | {r0['stack_mse_heldout']:.4g} (1.00) | 0 | 0 |")
    for key, v in res.items():
        if key == "rtn":
            continue
        mean_ratio = sum(b["ratio"] for b in v["blocks"]) / len(v["blocks"])
        print(f"| {key[1:]} | {mean_ratio:.3f} | {v['stack_mse_calib']:.4g} ({v['stack_mse_calib'] / r0['stack_mse_calib']:.2f}) "
              f"| {v['stack_mse_heldout']:.4g} ({v['stack_mse_heldout'] / r0['stack_mse_heldout']:.2f}) "
              f"| {v['search_seconds']:.1f} | {v['seconds_per_layer']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
