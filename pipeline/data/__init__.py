"""Calibration data and activations (DESIGN.md "How data flows", steps 3 and 5).

- ``sources``: ``--calib`` -> rows ``(id, image, prompt, answer, reason)`` (Parquet, JSONL + images,
  ``datasets`` folders, the built-in synthetic set), cheap model-free validation, seeded sampling.
- ``collate``: rows -> an Arrow table through the model's own processor and chat template.
- ``store``: per-layer Arrow IPC activation streams + per-sample meta, on any pyarrow filesystem.
- ``synthetic``: the built-in scene generator.

Submodules are imported explicitly (``from pipeline.data.store import ActivationStore``) so that
light users (the synthetic generator) do not pay for torch/transformers imports.
"""
