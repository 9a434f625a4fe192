"""Dtype names of the format (FORMAT §2) and their torch counterparts."""

from __future__ import annotations

import torch

from ..errors import FormatError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def to_torch(name: str) -> torch.dtype:
    """The torch dtype for a format dtype name; FormatError for an unknown one."""
    try:
        return TORCH_DTYPES[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown dtype {name!r} (expected one of {', '.join(TORCH_DTYPES)})") from None


def name_of(dtype: torch.dtype) -> str:
    """The format dtype name of a torch dtype; FormatError for one the format cannot store."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored (supported: {', '.join(TORCH_DTYPES)})") from None


def itemsize(name: str) -> int:
    return to_torch(name).itemsize
