"""Dtype names of the format (FORMAT §2) and their numpy counterparts (bfloat16 from ml_dtypes).

The format layer computes on numpy arrays so that reading, checking and merging adapters never
imports torch. Code that does run torch (training, live models, PEFT interop) meets these arrays
through :mod:`s2reg.format.arrays`; :func:`name_of` also names torch dtypes, recognised by their
text, so it needs no torch import either.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from ..errors import FormatError

NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES: dict[Any, str] = {v: k for k, v in NUMPY_DTYPES.items()}
_TORCH_ATTRIBUTES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                     "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_TORCH_NAMES = {f"torch.{attribute}": name for name, attribute in _TORCH_ATTRIBUTES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def to_numpy(name: str) -> np.dtype:
    """The numpy dtype for a format dtype name; FormatError for an unknown one."""
    try:
        return NUMPY_DTYPES[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown dtype {name!r} (expected one of {', '.join(NUMPY_DTYPES)})") from None


def to_torch(name: str):
    """The torch dtype for a format dtype name (imports torch: only for code that runs it)."""
    import torch

    to_numpy(name)  # the same error for an unknown name
    return getattr(torch, _TORCH_ATTRIBUTES[name])


def name_of(dtype: Any) -> str:
    """The format dtype name of a numpy or torch dtype; FormatError for one the format cannot store."""
    try:
        name = _NAMES.get(np.dtype(dtype)) if not str(dtype).startswith("torch.") else _TORCH_NAMES.get(str(dtype))
    except TypeError:
        name = None
    if name is None:
        raise FormatError(f"dtype {dtype} cannot be stored (supported: {', '.join(NUMPY_DTYPES)})")
    return name


def itemsize(name: str) -> int:
    return to_numpy(name).itemsize


def is_float(dtype: Any) -> bool:
    return name_of(dtype) in FLOAT_DTYPES
