"""Tensor sources: one protocol for everything that hands out a model's tensors by name.

A checkpoint on disk (:class:`~s2reg.tensors.reader.CheckpointSource` for safetensors,
:class:`~s2reg.tensors.torch_bin.TorchBinSource` for ``pytorch_model.bin`` state dicts), a state
dict in memory (:class:`MemorySource`) and a checkpoint seen through a co-permutation
(:class:`PermutedView`) all satisfy :class:`TensorSource`, so extract, verify, merge and training
export take any of them without probing for methods. :func:`open_source` picks the reader for a
path on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..format.digest import tensor_sha256
from ..format.arrays import read_array, to_torch
from ..format.s2ft import gather
from .reader import CheckpointSource, check_rows
from .memory import Closeable
from .torch_bin import TorchBinSource, holds_torch_bin

# name -> (stored dim, gather index) that puts a tensor into the view's order, or None to pass it through
IndexOf = Callable[[str], "tuple[str, Any] | None"]  # (FORMAT §4.1 axis, gather index)


class TensorSource(Protocol):
    """What s2reg reads from a model: names, header facts, tensors, digests and the config.

    ``get`` and ``get_rows`` return tensors the caller owns (never a view into the source);
    ``sha256_of`` is the digest of the tensor's bytes (FORMAT §2).
    """

    def names(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> Any: ...

    def get(self, name: str) -> Any: ...

    def get_rows(self, name: str, start: int, stop: int) -> Any: ...

    def sha256_of(self, name: str) -> str: ...

    def config(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...

    def __enter__(self) -> TensorSource: ...

    def __exit__(self, *exc: object) -> None: ...


class PermutedView(Closeable):
    """``source`` with some tensors reordered along one axis: a co-permuted checkpoint seen in another order.

    ``index_of(name)`` says how: ``(axis, index)`` gathers ``index`` along a FORMAT §4.1 axis (what
    ``ModelInfo.permute_index`` gives for a layer permutation), ``None`` leaves the tensor as stored.
    Shapes and dtypes never change. The view does not own ``source``: closing it closes nothing.
    """

    def __init__(self, source: TensorSource, index_of: IndexOf):
        self.source = source
        self._index_of = index_of

    def names(self) -> list[str]:
        return self.source.names()

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def dtype(self, name: str) -> Any:
        return self.source.dtype(name)

    def config(self) -> dict[str, Any] | None:
        return self.source.config()

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` in the view's order, as a numpy array (torch is not needed to read one)."""
        tensor = read_array(self.source, name)
        reorder = self._index_of(name)
        if reorder is None:
            return tensor
        axis, index = reorder
        return gather(tensor, axis, index)

    def get(self, name: str) -> Any:
        if self._index_of(name) is None:
            return self.source.get(name)
        return to_torch(self.array(name))

    def get_rows(self, name: str, start: int, stop: int) -> Any:
        if self._index_of(name) is None:
            return self.source.get_rows(name, start, stop)
        check_rows(name, self.shape(name), start, stop)
        return to_torch(self.array(name)[start:stop].copy())

    def sha256_of(self, name: str) -> str:
        if self._index_of(name) is None:
            return self.source.sha256_of(name)
        return tensor_sha256(self.array(name))

    def __repr__(self) -> str:
        return f"PermutedView({self.source!r})"


def open_source(path: str | os.PathLike) -> CheckpointSource | TorchBinSource:
    """Open a checkpoint on disk for reading: safetensors (file, or HF directory with optional shard
    index), or a directory of PyTorch ``pytorch_model.bin`` state dicts (official S2FT output)."""
    path = Path(path)
    if path.is_dir() and holds_torch_bin(path) and not any(path.glob("*.safetensors")):
        return TorchBinSource(path)
    return CheckpointSource(path)
