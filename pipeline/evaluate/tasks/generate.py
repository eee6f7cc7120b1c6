"""Model calls shared by the tasks: greedy answers through the model's own chat template, and
per-token log-likelihoods of calibration-format rows."""

from __future__ import annotations

from typing import Any

import torch


def move(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def chat_inputs(processor: Any, image: Any, prompt: str) -> dict[str, torch.Tensor]:
    """One user turn (image, if any, then the text) with the assistant turn opened, processed."""
    content: list[dict[str, Any]] = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    bos = getattr(processor.tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))  # the template may already start with BOS
    enc = processor(text=[text], images=[[image]] if image is not None else None, return_tensors="pt",
                    add_special_tokens=add_special)
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def greedy_answer(model: torch.nn.Module, processor: Any, image: Any, prompt: str, max_new_tokens: int,
                  device: torch.device, dtype: torch.dtype) -> str:
    """Greedy decoding at batch 1 (no padding, so the answer never depends on its batch)."""
    enc = move(chat_inputs(processor, image, prompt), device, dtype)
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def row_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """``[T, V]`` float32 CPU logits of one batch-1 calibration row."""
    return model(**move(inputs, device, dtype), use_cache=False).logits[0].float().cpu()


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` float64: -log p(token t+1 | ..t) at position t; the last position (no next token) is 0."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = torch.zeros(logits.shape[0], dtype=torch.float64)
    nxt = input_ids.reshape(-1)[1:].long()
    nll[:-1] = -logp[:-1].gather(1, nxt.unsqueeze(1)).squeeze(1)
    return nll
