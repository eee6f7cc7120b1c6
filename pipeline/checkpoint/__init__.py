"""Checkpoints: bit packing, part files, the compressed-tensors writer, the loader, validate.

No Ray here; file I/O is this package's job (unlike ``quant/`` and ``kernels/``).
"""

from .loader import iter_quantized, load_quantized_model
from .packing import pack_int32, pack_zero_points, unpack_int32, unpack_zero_points
from .parts import read_part, write_part
from .reference import read_reference, write_reference
from .validate import ValidationReport, format_report, validate_checkpoint
from .writer import check_output_dir, write_checkpoint

__all__ = [
    "check_output_dir",
    "format_report",
    "iter_quantized",
    "load_quantized_model",
    "pack_int32",
    "pack_zero_points",
    "read_part",
    "read_reference",
    "unpack_int32",
    "unpack_zero_points",
    "validate_checkpoint",
    "ValidationReport",
    "write_checkpoint",
    "write_part",
    "write_reference",
]
