"""numpy arrays at the edge with torch: the one place that converts between the two, bfloat16 included.

The format layer holds numpy arrays. Its constructors also take torch tensors (what training and
the README's examples hand in); :func:`as_array` turns one into an array without importing torch
unless the value already is a torch tensor. :func:`to_torch` is for the code that runs torch.
numpy has no bfloat16 of its own: ml_dtypes' is used, and torch's is crossed by reinterpreting the
same 16 bits, so no value is ever converted on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import dtypes

_SAME_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def is_torch(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def as_array(value: Any, dtype: Any = None) -> np.ndarray:
    """``value`` (a numpy array, a torch tensor, a sequence) as a numpy array, bits unchanged (then ``dtype``)."""
    if is_torch(value):
        import torch

        tensor = value.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            array = tensor.view(torch.int16).numpy().view(dtypes.to_numpy("BF16"))
        else:
            array = tensor.numpy()
    else:
        array = np.asarray(value)
    return array if dtype is None else array.astype(dtype, copy=False)


def read_array(source: Any, name: str) -> np.ndarray:
    """Tensor ``name`` of a tensor source or mapping as numpy: a checkpoint's own array reader when it has one
    (no torch), else what ``get`` (or indexing) hands over, converted."""
    if isinstance(source, Mapping):
        return as_array(source[name])
    read = getattr(source, "array", None) or source.get
    return as_array(read(name))


def to_torch(array: np.ndarray):
    """A torch tensor sharing ``array``'s bits (a copy only when the array is not contiguous or writable)."""
    import torch

    if not (array.flags.c_contiguous and array.flags.writeable):
        array = array.copy(order="C")  # np.ascontiguousarray would make a 0-d array 1-d
    if array.dtype == dtypes.to_numpy("BF16"):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def bits(array: np.ndarray) -> np.ndarray:
    """The array reinterpreted as unsigned integers of its width: equal bits, equal values (signed zeros, NaN payloads)."""
    array = array if array.flags.c_contiguous else array.copy(order="C")
    return array.view(_SAME_BITS[array.dtype.itemsize])


def dot(x: np.ndarray, y: np.ndarray) -> float:
    """``sum(x * y)`` in float64, without BLAS: its thread pool costs more to start than these sums take."""
    return float(np.multiply(x, y, dtype=np.float64).sum())


def unique(values: Any) -> np.ndarray:
    """The distinct values, sorted: ``np.unique`` without its import of ``numpy.ma`` (numpy 2 loads the
    masked-array package on the first call, 14 ms, a tenth of a command's start-up)."""
    flat = np.sort(np.asarray(values).reshape(-1))
    if flat.size < 2:
        return flat
    return flat[np.concatenate(([True], flat[1:] != flat[:-1]))]
