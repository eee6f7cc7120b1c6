"""``vlmq bench decode``: decode tokens/s and peak memory of a 7B-shape language model, fp16 vs W4 vs W3.

The model is ``transformers.Qwen2ForCausalLM`` built from a ``Qwen2Config`` (Qwen2-7B dimensions by
default) on the meta device, so no 15 GB of weights are ever initialized on the host; its
decoder Linears become our ``QuantLinear`` (q/k/v and gate/up fused, as inference engines do) or,
for the baseline, fp16 ``nn.Linear`` (cuBLAS), all filled with random values. Embeddings, norms
and ``lm_head`` stay fp16, except that a ``+head`` variant (``w4+head``, ``w3+head``) packs the
``lm_head`` like the layers (asymmetric, ``--group``; ``w3+head4``: with 4 bits): the layout of a
checkpoint written with ``vlmq quantize --quantize-lm-head [--lm-head-bits B]`` (the default recipe keeps
the head fp16). One decode step
(embedding, 28 layers, final norm, lm_head, greedy argmax, position + 1) is captured in one CUDA
graph over a static KV cache and replayed step after step, so kernels, not Python, are what is
timed. Our kernels launch with
programmatic dependent launch (kernels/pdl.py; ``--no-pdl`` to compare), the packed gate/up GEMV
applies silu-mul in its epilogue, the other packed GEMVs add their k-splits into fp32 buffers the
next kernel reads (batch <= 4), and rotary + KV write + attention are one launch per GQA group
on tensor cores; the fp16 baseline shares every glue kernel.

    python -m pipeline.evaluate.bench_decode --out bench-out   # batch 1 and 8: fp16, W4, W3, each packed variant
                                                               # with the lm_head fp16 and packed (+head)

Writes ``decode.json``, ``decode.md`` (the table, then vlmq's decode targets judged on it) and
``decode.png`` (tokens/s per variant and batch, each bar labelled with its ratio to fp16).

For experiments, ``VLMQ_DECODE_WHATIF=norm``, ``attn`` or ``norm,attn`` leaves the RMSNorms and/or the
attention out of the step (wrong outputs, marked in decode.md): how much of the step they cost (run 14:
attention ~8 µs a layer at W4, and a W4 step without it still under 2.8x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=32768,
                tie_word_embeddings=False)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, rms_norm_eps=1e-6, max_position_embeddings=2048,
            tie_word_embeddings=False)


def register(subparsers) -> None:
    p = subparsers.add_parser("decode", help="decode tokens/s and peak memory, fp16 vs W4 vs W3 (GPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=run)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench-decode", help="folder for decode.json and decode.md")
    p.add_argument("--variants", nargs="+", default=["fp16", "w4", "w3", "w4+head", "w3+head"],
                   help="fp16, w4, w3, w2, w8, w4a8; a '+head' suffix (w4+head) packs the lm_head too, as a "
                        "checkpoint written with `vlmq quantize --quantize-lm-head` has it, '+headB' with B bits "
                        "(w3+head4: `--lm-head-bits 4`) (default: fp16 w4 w3 w4+head w3+head)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--context", type=int, default=128, help="tokens already in the cache when timing starts")
    p.add_argument("--steps", type=int, default=128, help="decode steps timed")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the config's)")
    p.add_argument("--tiny", action="store_true", help="a tiny config (checks the script; CPU with the interpreter)")
    p.add_argument("--profile", action="store_true",
                   help="also trace a few replayed steps and write decode_profile.md: GPU time per step by "
                        "kernel and grid (which layer is which), and how much of the step no kernel runs")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="programmatic dependent launch of our kernels (Hopper+): each may start streaming "
                        "weights while the previous one finishes (kernels/pdl.py); --no-pdl to compare")


# ----------------------------------------------------------------------------- the model


def config_for(tiny: bool, layers: int = 0):
    from transformers import Qwen2Config

    kw = dict(TINY if tiny else QWEN2_7B)
    if layers:
        kw["num_hidden_layers"] = layers
    return Qwen2Config(**kw)


def _random_qlinear(k: int, n: int, bits: int, group: int | None, sym: bool, act_bits: int, device, gen,
                    bias=None, glu: int = 0):
    import torch

    from kernels import QuantLinear
    from pipeline.quant.quantizer import QuantScheme, QuantizedWeight

    ng = 1 if group is None else k // group
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if sym else (0, 2**bits)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int16, device=device, generator=gen)
    scale = (torch.rand(n, ng, device=device, generator=gen) * 0.004 + 0.001).half()
    zero = None if sym else torch.randint(0, 2**bits, (n, ng), dtype=torch.int16, device=device, generator=gen)
    qw = QuantizedWeight(q, scale, zero, QuantScheme(bits, group, sym))
    return QuantLinear.from_quantized(qw, bias, act_bits=act_bits, glu=glu)


GLU_BLOCK = 32  # gate/up rows interleaved in blocks of 32: the GEMV applies silu-mul in its epilogue
_VARIANT = re.compile(r"^(?:fp16|w([2348])(a8)?(\+head([2348])?)?)$")


def parse_variant(v: str) -> tuple[int, int, int | None]:
    """``"w3+head4"`` -> (layer bits 3, activation bits 16, head bits 4); ``"w4+head"`` -> (4, 16, 4);
    ``"w4"`` -> (4, 16, None: fp16 head); ``"fp16"`` -> (16, 16, None). Raises on anything else."""
    m = _VARIANT.match(v)
    if m is None:
        raise ValueError(f"unknown decode variant {v!r}: fp16, w2/w3/w4/w8, w4a8, and a '+head' or '+headB' suffix "
                         f"(w3+head, w3+head4: the lm_head packed with the layers' or B bits)")
    if v == "fp16":
        return 16, 16, None
    bits, act = int(m.group(1)), 8 if m.group(2) else 16
    if act == 8 and m.group(3):
        raise ValueError(f"{v}: the packed lm_head is weight-only (as `vlmq quantize --quantize-lm-head`)")
    head = (int(m.group(4)) if m.group(4) else bits) if m.group(3) else None
    return bits, act, head


class DecodeModel:
    """The decode step of a Qwen2 decoder over flat per-layer weights. ``linear(name, k, n, bias)``
    builds each (fused) projection, so the fp16 and packed variants share everything else."""

    def __init__(self, config, variant: str, batch: int, max_len: int, device, group: int | None = 128,
                 seed: int = 0, hf_model=None):
        import torch
        from torch import nn

        self.cfg = config
        self.device = device
        self.dtype = torch.float16
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        c = config
        self.hq, self.hkv = c.num_attention_heads, c.num_key_value_heads
        self.d = c.hidden_size // c.num_attention_heads
        h = c.hidden_size
        self.eps = c.rms_norm_eps
        theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 1e4)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.d, 2, device=device, dtype=torch.float32) / self.d))

        def rnd(*shape, std=0.02):
            return (torch.randn(*shape, device=device, generator=gen) * std).to(self.dtype)

        def weight_of(path):  # copy from a materialized HF model (CPU check), else random
            if hf_model is None:
                return None
            return hf_model.get_parameter(path).detach().to(device=device, dtype=self.dtype)

        layer_bits, act_bits, head_bits = parse_variant(variant)

        def linear(paths: list[str], k: int, n: int, has_bias: bool, glu: int = 0, bits: int | None = None):
            ws = [weight_of(p + ".weight") for p in paths]
            if glu and ws[0] is not None:
                from kernels.decode_ops import interleave_gate_up

                w = interleave_gate_up(ws[0], ws[1], glu)
            else:
                w = torch.cat(ws) if ws[0] is not None else rnd(n, k)
            b = None
            if has_bias:
                bs = [weight_of(p + ".bias") for p in paths]
                b = torch.cat(bs) if bs[0] is not None else rnd(n)
            if variant == "fp16":
                lin = nn.Linear(k, n, bias=has_bias, device=device, dtype=self.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if has_bias:
                        lin.bias.copy_(b)
                return lin
            bits = bits or layer_bits
            grp = None if act_bits == 8 else group
            sym = act_bits == 8
            if hf_model is None:
                return _random_qlinear(k, n, bits, grp, sym, act_bits, device, gen, b, glu)
            from kernels import QuantLinear
            from pipeline.quant.quantizer import QuantScheme, quantize_weight

            return QuantLinear.from_quantized(quantize_weight(w.float(), QuantScheme(bits, grp, sym), self.dtype),
                                              b, act_bits=act_bits, glu=glu)

        if hf_model is None:  # the module tree (shapes, biases) of the real model, without weights
            from transformers import Qwen2ForCausalLM

            with torch.device("meta"):
                meta = Qwen2ForCausalLM(c)
        else:
            meta = hf_model

        def dims(paths: list[str]) -> tuple[int, int, bool]:
            mods = [meta.get_submodule(p) for p in paths]
            return mods[0].in_features, sum(m.out_features for m in mods), mods[0].bias is not None

        # packed variants fuse silu-mul into the gate/up GEMV (W4A8 and fp16 keep a separate launch)
        self.glu = GLU_BLOCK if variant != "fp16" and not variant.endswith("a8") else 0
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "in_norm": weight_of(p + "input_layernorm.weight") if hf_model else 1 + rnd(h, std=0.05),
                "post_norm": weight_of(p + "post_attention_layernorm.weight") if hf_model else 1 + rnd(h, std=0.05),
                "qkv": linear(qkv := [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                              *dims(qkv)),
                "o": linear([p + "self_attn.o_proj"], *dims([p + "self_attn.o_proj"])),
                "gate_up": linear(gu := [p + "mlp.gate_proj", p + "mlp.up_proj"], *dims(gu), glu=self.glu),
                "down": linear([p + "mlp.down_proj"], *dims([p + "mlp.down_proj"])),
                "k_cache": torch.zeros(batch, self.hkv, max_len, self.d, dtype=self.dtype, device=device),
                "v_cache": torch.zeros(batch, self.hkv, max_len, self.d, dtype=self.dtype, device=device),
            })
        del meta
        # batch <= 4 on the fp16-pair GEMV: q/k/v, o and down add their k-splits straight into fp32
        # buffers (one memset per step for all layers) that the next kernel reads and rounds
        self.acc_flat = None
        if variant != "fp16" and not variant.endswith("a8") and batch <= 4:
            sizes = [lay["qkv"].out_features for lay in self.layers[:1]] + [h, h]
            self.acc_flat = torch.zeros(len(self.layers) * batch * sum(sizes), dtype=torch.float32, device=device)
            off = 0
            for lay in self.layers:
                for name, n in zip(("qkv_acc", "o_acc", "down_acc"), sizes):
                    lay[name] = self.acc_flat[off:off + batch * n].view(batch, n)
                    off += batch * n
        self.embed = weight_of("model.embed_tokens.weight") if hf_model else rnd(c.vocab_size, h)
        self.norm = weight_of("model.norm.weight") if hf_model else 1 + rnd(h, std=0.05)
        if head_bits:  # the lm_head packed (`vlmq quantize --quantize-lm-head [--lm-head-bits B]`)
            self.lm_head = linear(["lm_head"], h, c.vocab_size, False, bits=head_bits)
        else:
            self.lm_head = weight_of("lm_head.weight") if hf_model else rnd(c.vocab_size, h)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.int32, device=device)
        # VLMQ_DECODE_WHATIF=norm,attn (timing experiments, wrong outputs): leave the RMSNorms and/or the
        # attention out of the step, to bound what fusing or speeding them up could save
        self.whatif = set(filter(None, os.environ.get("VLMQ_DECODE_WHATIF", "").split(",")))
        if self.whatif - {"norm", "attn"}:
            raise ValueError(f"VLMQ_DECODE_WHATIF: unknown {sorted(self.whatif - {'norm', 'attn'})} (norm, attn)")
        self.logits = None

    def fill_cache(self, upto: int, gen) -> None:
        """Random keys/values in positions [0, upto): a prompt already processed."""
        import torch

        for lay in self.layers:
            for name in ("k_cache", "v_cache"):
                lay[name][:, :, :upto].copy_(torch.randn(lay[name][:, :, :upto].shape, generator=gen,
                                                         device=self.device).to(self.dtype))
        self.pos.fill_(upto)

    def step(self) -> None:
        """One token per sequence: reads ``tokens`` and ``pos``, writes ``logits``, the greedy next
        ``tokens`` and ``pos + 1``. Only fixed-shape device work: capturable in a CUDA graph."""
        import torch

        from kernels.decode_ops import add_rmsnorm, rope_attention, silu_mul

        def proj(lay, name, x):
            if self.acc_flat is None:
                return lay[name](x)
            return lay[name].accumulate(x, lay[name + "_acc"])

        skip = self.whatif
        if "norm" in skip:  # timing what-if only: the residual passed on unnormalized, nothing added
            add_rmsnorm = lambda x, res, w, eps: res  # noqa: E731
        if "attn" in skip:
            attn_out = torch.zeros(self.tokens.shape[0], self.hq * self.d, dtype=self.dtype, device=self.device)

        x = torch.nn.functional.embedding(self.tokens, self.embed)
        res = x.clone()
        if self.acc_flat is not None:
            self.acc_flat.zero_()
        normed = add_rmsnorm(None, res, self.layers[0]["in_norm"], self.eps)
        for i, lay in enumerate(self.layers):
            qkv = proj(lay, "qkv", normed)
            if "attn" in skip:
                attn = attn_out
            else:
                attn = rope_attention(qkv, self.inv_freq, self.pos, lay["k_cache"], lay["v_cache"], self.hq,
                                      self.hkv)
            normed = add_rmsnorm(proj(lay, "o", attn), res, lay["post_norm"], self.eps)
            act = lay["gate_up"](normed) if self.glu else silu_mul(lay["gate_up"](normed))
            mlp = proj(lay, "down", act)
            nxt = self.layers[i + 1]["in_norm"] if i + 1 < len(self.layers) else self.norm
            normed = add_rmsnorm(mlp, res, nxt, self.eps)
        if isinstance(self.lm_head, torch.Tensor):
            self.logits = torch.nn.functional.linear(normed, self.lm_head)
        else:
            self.logits = self.lm_head(normed)
        self.tokens.copy_(self.logits.argmax(dim=-1))
        self.pos.add_(1)

    def weight_bytes(self) -> int:
        import torch

        def nbytes(mod) -> int:
            if isinstance(mod, torch.Tensor):
                return mod.numel() * mod.element_size()
            return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))

        n = nbytes(self.embed) + nbytes(self.lm_head)
        for lay in self.layers:
            for k in ("qkv", "o", "gate_up", "down"):
                n += nbytes(lay[k])
        return n


# ----------------------------------------------------------------------------- timing


def capture_step(model: DecodeModel):
    """One decode step captured in a CUDA graph (on a side stream, as torch requires); the step
    must have run eagerly once (kernels compiled, autotuned, workspaces sized)."""
    import torch

    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g):
        model.step()
    torch.cuda.current_stream().wait_stream(s)
    return g


def profile_graph(g, steps: int) -> dict:
    """GPU time per step of each (kernel, grid) over ``steps`` replays, from a profiler trace (the
    grid tells the GEMVs of different shapes apart), and the step's span vs the sum of kernel
    times: with plain launches the difference is time in which no kernel ran."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            g.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    return summarize_kernels(events, steps)


def summarize_kernels(events: list[dict], steps: int) -> dict:
    """Chrome-trace events -> per-step µs and calls of each (kernel, grid), the traced span and the
    sum of kernel durations (both per step)."""
    kern = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kern:
        return {}
    agg: dict[tuple[str, str], list[float]] = {}
    for e in kern:
        grid = "x".join(str(v) for v in (e.get("args", {}).get("grid") or []))
        a = agg.setdefault((e["name"][:60], grid), [0.0, 0])
        a[0] += e["dur"]
        a[1] += 1
    span = max(e["ts"] + e["dur"] for e in kern) - min(e["ts"] for e in kern)
    busy = sum(e["dur"] for e in kern)
    rows = sorted(({"kernel": k[0], "grid": k[1], "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps}
                   for k, v in agg.items()), key=lambda r: -r["us_per_step"])
    return {"span_us_per_step": span / steps, "kernel_us_per_step": busy / steps, "rows": rows}


def time_steps(model: DecodeModel, context: int, steps: int, pdl: bool = True):
    """Milliseconds per step of ``model`` replayed as one CUDA graph from position ``context``, and the
    graph. Two eager steps first (compile, autotune, size the split-K workspace); the peak-memory
    counter is reset after them, so the peak is what decoding holds (weights, cache, workspaces, the
    graph's pool), not the construction of random packed weights nor the autotuner's first calls
    (run 9-10: 16-20 GB for the +head rows, all of it the packing of a random 152k x 3584 head)."""
    import torch

    from kernels.pdl import programmatic_launch

    with torch.no_grad(), programmatic_launch(pdl):
        for _ in range(2):
            model.step()
        torch.cuda.synchronize()
        g = capture_step(model)
        model.pos.fill_(context)
        for _ in range(3):
            g.replay()
        model.pos.fill_(context)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            g.replay()
        b.record()
        b.synchronize()
    return a.elapsed_time(b) / steps, g


def bench_one(config, variant: str, batch: int, context: int, steps: int, group: int | None,
              pdl: bool = True, profile: bool = False) -> dict:
    import torch

    from kernels.pdl import mode, programmatic_launch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = DecodeModel(config, variant, batch, context + steps + 8, "cuda", group)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    model.fill_cache(context, gen)
    model.tokens.copy_(torch.randint(0, config.vocab_size, (batch,), device="cuda", generator=gen))
    with programmatic_launch(pdl):
        pdl_mode = mode(torch.device("cuda"))
    ms, g = time_steps(model, context, steps, pdl)
    prof = profile_graph(g, 8) if profile else None
    r = {"variant": variant, "batch": batch, "context": context, "steps": steps, "pdl": pdl_mode, "ms_per_step": ms,
         "tokens_per_s": batch * 1000.0 / ms, "weights_gb": model.weight_bytes() / 1e9,
         "peak_gb": (torch.cuda.max_memory_allocated() - base) / 1e9,
         "finite": bool(torch.isfinite(model.logits).all())}
    if prof:
        r["profile"] = prof
    if variant != "fp16":  # what the autotuner chose for each projection shape of this run
        from kernels import autotune

        r["picked"] = {f"{k[7]}->{k[6]}{' glu' if k[9] else ''}{' acc' if k[10] else ''}": name
                       for k, name in autotune.chosen().items()
                       if k[0] == "a16" and k[1] in parse_variant(variant)[::2] and k[5] == autotune.m_bucket(batch)
                       and k[-1] == pdl_mode}
    del g, model
    torch.cuda.empty_cache()
    return r


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, transformers "
             f"{meta['transformers']}; {meta['date']}; model {meta['model']}; context {meta['context']}, "
             f"{meta['steps']} steps; programmatic dependent launch "
             f"{('on, ' + meta.get('pdl_trigger', 'late') + ' release') if meta.get('pdl') else 'off'}. "
             "Peak GB: memory held while decoding (weights, KV cache, workspaces, graph pool), after warm-up."
             + (f" **What-if, wrong outputs: the step without {meta['whatif']}** (VLMQ_DECODE_WHATIF)."
                if meta.get("whatif") else ""), "",
             "| variant | batch | ms / step | tokens/s | x fp16 | weights GB | peak GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = f"{r['speedup_vs_fp16']:.2f}" if r.get("speedup_vs_fp16") else ""
        lines.append(f"| {r['variant']} | {r['batch']} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:.0f} | {sp} | "
                     f"{r['weights_gb']:.2f} | {r['peak_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def profile_markdown(rows: list[dict], meta: dict, top: int = 14) -> str:
    out = [f"Kernel time per decode step (profiler trace of 8 replays); {meta['device']}, {meta['date']}, "
           f"PDL {'on' if meta.get('pdl') else 'off'}.", ""]
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        out += [f"### {r['variant']}, batch {r['batch']}: step {r['ms_per_step'] * 1000:.0f} µs timed; traced span "
                f"{p['span_us_per_step']:.0f} µs, kernels busy {p['kernel_us_per_step']:.0f} µs", "",
                "| kernel | grid | µs / step | calls / step | µs / call |", "|---|---|---:|---:|---:|"]
        for k in p["rows"][:top]:
            out.append(f"| {k['kernel']} | {k['grid']} | {k['us_per_step']:.1f} | {k['calls_per_step']:.0f} | "
                       f"{k['us_per_step'] / max(k['calls_per_step'], 1e-9):.2f} |")
        out.append("")
    return "\n".join(out)


def run(args) -> int:
    import torch

    from pipeline.errors import VlmqError

    if not torch.cuda.is_available():
        raise VlmqError("vlmq bench decode needs a CUDA GPU",
                        "run it on a GPU machine (tests/kernels/test_decode.py checks the step on CPU)")
    import transformers
    import triton

    for v in args.variants:  # a misspelt variant fails here, not after the first ones have run
        try:
            parse_variant(v)
        except ValueError as e:
            raise VlmqError(str(e), "fix --variants (see --help)") from None
    config = config_for(args.tiny, args.layers)
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "model": "tiny" if args.tiny else f"Qwen2-7B shape ({config.num_hidden_layers} layers)",
            "context": args.context, "steps": args.steps, "pdl": args.pdl,
            "pdl_trigger": os.environ.get("VLMQ_PDL_TRIGGER", "late"), "cmd": " ".join(sys.argv),
            "whatif": os.environ.get("VLMQ_DECODE_WHATIF", "")}
    rows, base = [], {}
    for batch in args.batch:
        for v in args.variants:
            try:
                r = bench_one(config, v, batch, args.context, args.steps, args.group or None, args.pdl, args.profile)
            except Exception as e:
                print(f"FAILED {v} batch {batch}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            if v == "fp16":
                base[batch] = r["tokens_per_s"]
            r["speedup_vs_fp16"] = r["tokens_per_s"] / base[batch] if batch in base else None
            rows.append(r)
            print(f"{v:6} batch {batch:2}: {r['ms_per_step']:.3f} ms/step  {r['tokens_per_s']:8.1f} tok/s  "
                  f"x{(r['speedup_vs_fp16'] or 0):.2f}  weights {r['weights_gb']:.2f} GB  peak {r['peak_gb']:.2f} GB"
                  + (f"  [{'; '.join(f'{s}: {n}' for s, n in r['picked'].items())}]" if r.get("picked") else ""),
                  flush=True)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    from . import bench_report

    result = {"meta": meta, "rows": rows}
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write(to_markdown(rows, meta) + "\n" + bench_report.section("decode", result))
    bench_report.save_plot(args.out, "decode", result)
    if not meta["whatif"]:
        print(bench_report.targets_line(bench_report.check(rows, "decode")), flush=True)
    if args.profile:
        with open(os.path.join(args.out, "decode_profile.md"), "w") as f:
            f.write(profile_markdown(rows, meta))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate.bench_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
