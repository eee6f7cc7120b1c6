"""``speed``: weight bytes, peak GPU memory and batch-1 decode tokens/s of one checkpoint.

Weight bytes are the checkpoint's ``*.safetensors`` files on disk. On a GPU the checkpoint (as
loaded for the other tasks, ``--backend triton`` for vlmq's kernels) decodes greedily from a
one-image prompt: decode tokens/s = ``(N - 1) / (t(N new tokens) - t(1 new token))``, so prefill
is not counted; peak memory is ``torch.cuda.max_memory_allocated`` over that run with only this
model resident. This times transformers' generate loop (eager, Python per step), not the CUDA-graph
decode step of ``vlmq bench decode``, which runs a Qwen2-shape language model from random or
re-quantized weights and therefore cannot time a given checkpoint's own packed weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .base import RunContext, Task

NO_GPU = "n/a (no GPU)"
DECODE_TOKENS = 64
REPEATS = 3


@dataclass(frozen=True)
class Speed(Task):
    def run(self, ctx: RunContext, start: int, stop: int) -> list[dict[str, Any]]:
        rec: dict[str, Any] = {"weight_bytes": ctx.ckpt.weight_bytes, "device": str(ctx.device)}
        if ctx.device.type != "cuda":
            rec.update(peak_gpu_mem_bytes=NO_GPU, decode_tokens_per_s=NO_GPU)
            return [rec]
        rec.update(_measure(ctx))
        return [rec]

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(records[0]) if records else {}

    def headline(self, metrics: dict[str, Any]) -> tuple[str, float | None]:
        v = metrics.get("decode_tokens_per_s")
        return "decode tok/s (b1)", v if isinstance(v, (int, float)) else None


def _prompt_inputs(ctx: RunContext) -> dict[str, torch.Tensor]:
    from ...models.tiny import tiny_image
    from .generate import chat_inputs, move

    image = tiny_image(seed=0, size=(64, 64))
    return move(chat_inputs(ctx.processor, image, "Describe this image."), ctx.device, ctx.dtype)


@torch.no_grad()
def _measure(ctx: RunContext) -> dict[str, Any]:
    enc = _prompt_inputs(ctx)
    tok = ctx.processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx.model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(4)  # warm-up: kernel compilation, autotuning
    torch.cuda.reset_peak_memory_stats()
    t1 = min(gen(1) for _ in range(REPEATS))
    tn = min(gen(DECODE_TOKENS) for _ in range(REPEATS))
    return {"peak_gpu_mem_bytes": int(torch.cuda.max_memory_allocated()),
            "decode_tokens_per_s": (DECODE_TOKENS - 1) / max(tn - t1, 1e-9),
            "gpu": torch.cuda.get_device_name(), "decode_tokens": DECODE_TOKENS}
