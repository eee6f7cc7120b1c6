"""The validation reference stored inside a checkpoint: held-out inputs + fake-quant logits.

The quantize job computes the logits of its in-memory fake-quant model (search results
applied before packing) on a few held-out samples and stores them with the exact model inputs
in ``validation/reference.safetensors``. ``validate`` reloads the checkpoint from disk, runs
the same inputs and must agree to fp rounding: that proves packing, writing and loading lost
nothing. Call :func:`write_reference` from the writer's ``stage_hook`` so the file is hashed
into the manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REFERENCE_PATH = "validation/reference.safetensors"
_FORMAT = "vlmq-reference/1"


@dataclass
class Reference:
    inputs: list[dict[str, torch.Tensor]]
    logits: list[torch.Tensor]
    fp_logits: list[torch.Tensor] | None
    model_dtype: torch.dtype | None  # the dtype the reference model computed in (None: config's)
    positions: list[torch.Tensor] | None = None  # token positions the logits are of (None: all)


def write_reference(
    directory: str | os.PathLike,
    inputs: list[dict[str, torch.Tensor]],
    logits: list[torch.Tensor],
    fp_logits: list[torch.Tensor] | None = None,
    model_dtype: torch.dtype | None = None,
    positions: list[torch.Tensor] | None = None,
) -> Path:
    """Write ``directory/validation/reference.safetensors``. ``inputs[i]`` are ``model(**inputs[i])`` kwargs
    (floating inputs are cast to the model dtype when replayed).

    ``logits``: the fake-quant model's (what the checkpoint must reproduce); ``fp_logits``
    (optional): the fp model's, so validate can also report KL and top-1 agreement against fp;
    ``model_dtype``: the dtype the reference model ran in, so validate reloads in the same one;
    ``positions`` (optional): the token positions ``logits[i]`` rows are of. A real vocabulary makes
    full logits large (700 tokens x 152k x fp32 = 0.4 GB a sample), so jobs keep a few positions.
    """
    if len(inputs) != len(logits) or not inputs:
        raise ValueError(f"need one logits tensor per input sample, got {len(inputs)} inputs, {len(logits)} logits")
    if fp_logits is not None and len(fp_logits) != len(logits):
        raise ValueError(f"need one fp logits tensor per sample, got {len(fp_logits)} for {len(logits)}")
    tensors: dict[str, torch.Tensor] = {}
    names: list[list[str]] = []
    for i, (inp, lg) in enumerate(zip(inputs, logits)):
        keys = []
        for k, v in inp.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"sample {i} input {k!r} is {type(v).__name__}, expected a tensor")
            if "." in k:
                raise ValueError(f"input name {k!r} must not contain '.'")
            tensors[f"sample{i}.{k}"] = v.detach().cpu().contiguous()
            keys.append(k)
        tensors[f"sample{i}.logits"] = lg.detach().cpu().contiguous()
        if fp_logits is not None:
            tensors[f"sample{i}.fp_logits"] = fp_logits[i].detach().cpu().contiguous()
        if positions is not None:
            tensors[f"sample{i}.positions"] = positions[i].detach().cpu().to(torch.int64).contiguous()
        names.append(keys)
    path = Path(directory) / REFERENCE_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "vlmq_reference": _FORMAT, "inputs": json.dumps(names)}
    if model_dtype is not None:
        meta["model_dtype"] = str(model_dtype).removeprefix("torch.")
    save_file(tensors, str(path), metadata=meta)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return path


def read_reference(ckpt_dir: str | os.PathLike) -> Reference | None:
    """The reference stored in a checkpoint, or None when it has none."""
    path = Path(ckpt_dir) / REFERENCE_PATH
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("vlmq_reference") != _FORMAT:
            raise ValueError(f"{path} is not a vlmq reference file")
        names = json.loads(meta["inputs"])
        inputs = [{k: f.get_tensor(f"sample{i}.{k}") for k in keys} for i, keys in enumerate(names)]
        logits = [f.get_tensor(f"sample{i}.logits") for i in range(len(names))]
        fp = pos = None
        if "sample0.fp_logits" in set(f.keys()):
            fp = [f.get_tensor(f"sample{i}.fp_logits") for i in range(len(names))]
        if "sample0.positions" in set(f.keys()):
            pos = [f.get_tensor(f"sample{i}.positions") for i in range(len(names))]
    dtype = getattr(torch, meta["model_dtype"]) if "model_dtype" in meta else None
    return Reference(inputs=inputs, logits=logits, fp_logits=fp, model_dtype=dtype, positions=pos)
