"""Dtype names of the format (FORMAT §2) and their numpy counterparts (bfloat16 from ml_dtypes).

The format layer computes on numpy arrays so that reading, checking and merging adapters never
imports torch. Code that does run torch (training, live models, PEFT interop) meets these arrays
through :mod:`s2reg.format.arrays`; :func:`name_of` also names torch dtypes, recognised by their
text, so it needs no torch import either.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from ..errors import FormatError

# name -> (numpy type name, item size, torch attribute); numpy is imported only to build real dtypes,
# so that reading and checking manifests and headers never pays for it.
_TABLE: dict[str, tuple[str, int, str]] = {
    "F64": ("float64", 8, "float64"), "F32": ("float32", 4, "float32"), "F16": ("float16", 2, "float16"),
    "BF16": ("bfloat16", 2, "bfloat16"), "I64": ("int64", 8, "int64"), "I32": ("int32", 4, "int32"),
    "I16": ("int16", 2, "int16"), "I8": ("int8", 1, "int8"), "U8": ("uint8", 1, "uint8"), "BOOL": ("bool", 1, "bool"),
}
NAMES = tuple(_TABLE)
_TORCH_NAMES = {f"torch.{torch_name}": name for name, (_, _, torch_name) in _TABLE.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@cache
def _numpy_dtypes() -> dict[str, Any]:
    import ml_dtypes
    import numpy as np

    return {name: np.dtype(ml_dtypes.bfloat16 if name == "BF16" else numpy_name)
            for name, (numpy_name, _, _) in _TABLE.items()}


@cache
def _numpy_names() -> dict[Any, str]:
    return {v: k for k, v in _numpy_dtypes().items()}


def check(name: Any) -> str:
    """``name`` if it is a format dtype name; FormatError otherwise."""
    if not isinstance(name, str) or name not in _TABLE:
        raise FormatError(f"unknown dtype {name!r} (expected one of {', '.join(NAMES)})")
    return name


def to_numpy(name: str):
    """The numpy dtype for a format dtype name; FormatError for an unknown one."""
    return _numpy_dtypes()[check(name)]


def to_torch(name: str):
    """The torch dtype for a format dtype name (imports torch: only for code that runs it)."""
    import torch

    return getattr(torch, _TABLE[check(name)][2])


def name_of(dtype: Any) -> str:
    """The format dtype name of a numpy or torch dtype; FormatError for one the format cannot store."""
    if str(dtype).startswith("torch."):
        name = _TORCH_NAMES.get(str(dtype))
    else:
        import numpy as np

        try:
            name = _numpy_names().get(np.dtype(dtype))
        except TypeError:
            name = None
    if name is None:
        raise FormatError(f"dtype {dtype} cannot be stored (supported: {', '.join(NAMES)})")
    return name


def itemsize(name: str) -> int:
    return _TABLE[check(name)][1]


def is_float(dtype: Any) -> bool:
    return name_of(dtype) in FLOAT_DTYPES
