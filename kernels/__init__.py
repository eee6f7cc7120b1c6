"""Triton kernels for packed low-bit weights (pure torch/Triton: no Ray, no file I/O)."""
