"""An in-memory state dict as a tensor source (:class:`s2reg.tensors.source.TensorSource`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import NotFound
from ..format import dtypes
from ..format.digest import tensor_sha256
from .reader import check_rows


class Closeable:
    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemorySource(Closeable):
    """A state dict (and optionally its config) as a tensor source; tensors are copied out."""

    def __init__(self, tensors: Mapping[str, Any], config: Mapping[str, Any] | None = None,
                 *, label: str = "in-memory model"):
        self._tensors = {name: tensor.detach() for name, tensor in tensors.items()}
        self._config = dict(config) if config is not None else None
        self.label = label

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise NotFound(f"{self.label}: no tensor named {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> np.dtype:
        """numpy's dtype, as every tensor source answers (the tensors themselves stay torch)."""
        return dtypes.to_numpy(dtypes.name_of(self._tensor(name).dtype))

    def get(self, name: str) -> Any:
        return self._tensor(name).clone().contiguous()

    def get_rows(self, name: str, start: int, stop: int) -> Any:
        tensor = self._tensor(name)
        check_rows(name, tuple(tensor.shape), start, stop)
        return tensor[start:stop].clone().contiguous()

    def sha256_of(self, name: str) -> str:
        return tensor_sha256(self._tensor(name))

    def config(self) -> dict[str, Any] | None:
        return dict(self._config) if self._config is not None else None

    def __repr__(self) -> str:
        return f"MemorySource({self.label!r}, {len(self._tensors)} tensors)"
