"""PISA deltas (FORMAT §5): a few rfft2 coefficients per block, reconstructed by inverse FFT.

The target (its checks, manifest entry and payload) is numpy. Reconstruction runs in torch, in
:mod:`.pisa_fft`, imported only when a delta is actually reconstructed: the one kernel that
merging, unmerging, inspection and training share.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import FormatError, NonFiniteError, ShapeError
from . import dtypes, limits
from .._lazy import exports
from .arrays import as_array, to_torch
from .manifest import require, require_dtype, require_shape, warn_unknown

COEFFICIENT_DTYPES = frozenset({"F32", "F16", "BF16"})
MAX_BLOCK_AREA = 1 << 24
# the kernel's names, importable from here too (pisa_fft imports torch, so only when used)
__getattr__ = exports(__name__, dict.fromkeys(("reconstruct", "delta_dot", "Spectral", "pisa_top_k"), "s2reg.format.pisa_fft"),
                      globals())


def _kernel():
    return importlib.import_module(".pisa_fft", __package__)


def half_width(block: tuple[int, int]) -> int:
    """Width of the rfft2 half-plane of a ``(bh, bw)`` block: ``bw // 2 + 1``."""
    return block[1] // 2 + 1


def self_conjugate_columns(bw: int) -> list[int]:
    """The half-plane columns that are their own mirror (v = 0, and v = bw/2 for even bw): FORMAT §5.3 takes the
    Hermitian part there."""
    return [0] + ([bw // 2] if bw % 2 == 0 and bw > 1 else [])


def grid_of(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """``(ceil(out / bh), ceil(in / bw))`` (FORMAT §5.1)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def add_delta(weight: np.ndarray, delta: np.ndarray, *, subtract: bool = False) -> np.ndarray:
    """FORMAT §5.3's one merge rule: cast_D(float32(W) +/- delta), rounding to nearest-even."""
    with np.errstate(all="ignore"):
        wide = weight.astype(np.float32)
        return (wide - delta if subtract else wide + delta).astype(weight.dtype)


@dataclass(eq=False)
class PISATarget:
    """One tensor's PISA delta (FORMAT §5.2). ``coefficients`` is real ``[blocks, k, 2]`` as stored."""

    kind: ClassVar[str] = "pisa"
    shape: tuple[int, ...]
    dtype: np.dtype
    block: tuple[int, int]
    indices: np.ndarray
    coefficients: np.ndarray
    scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # torch tensors and dtypes are taken too (training hands them in)
        self.dtype = dtypes.to_numpy(dtypes.name_of(self.dtype))
        self.indices, self.coefficients = as_array(self.indices), as_array(self.coefficients)

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.shape, self.block)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def num_params(self) -> int:
        """Trainable real numbers: a complex coefficient counts twice."""
        return int(self.coefficients.size)

    def complex_coefficients(self):
        """The stored coefficients as a complex64 torch tensor ``[blocks, k]`` (what the kernel takes)."""
        import torch

        c = to_torch(self.coefficients.astype(np.float32))
        return torch.complex(c[..., 0], c[..., 1])

    def check(self, name: str, *, allow_nonfinite: bool = False) -> None:
        """Every rule of FORMAT §5.1-5.2; raises FormatError / ShapeError / NonFiniteError."""
        if len(self.shape) != 2:
            raise ShapeError(f"{name}: PISA targets must be rank 2, shape is {list(self.shape)}")
        if dtypes.name_of(self.dtype) not in dtypes.FLOAT_DTYPES:
            raise FormatError(f"{name}: PISA needs a float base tensor, got {self.dtype}")
        bh, bw = self.block
        if bh < 1 or bw < 1 or bh * bw > MAX_BLOCK_AREA:
            raise ShapeError(f"{name}: block {list(self.block)} must have sides >= 1 and area <= {MAX_BLOCK_AREA}")
        if not math.isfinite(self.scale):
            raise NonFiniteError(f"{name}: scale {self.scale} is not finite")
        if dtypes.name_of(self.coefficients.dtype) not in COEFFICIENT_DTYPES:
            raise FormatError(f"{name}: coefficients must be F32, F16 or BF16, got {self.coefficients.dtype}")
        blocks = self.grid[0] * self.grid[1]
        idx = self.indices
        if idx.ndim != 2 or idx.shape[0] != blocks or idx.shape[1] < 1:
            raise ShapeError(f"{name}: indices shape {list(idx.shape)}, expected [{blocks}, k>=1] for grid {list(self.grid)}")
        if list(self.coefficients.shape) != [blocks, idx.shape[1], 2]:
            raise ShapeError(
                f"{name}: coefficients shape {list(self.coefficients.shape)}, expected [{blocks}, {idx.shape[1]}, 2]"
            )
        positions = bh * half_width(self.block)
        if int(idx.min()) < 0 or int(idx.max()) >= positions:
            raise ShapeError(f"{name}: frequency index out of range [0, {positions}) of the {bh}x{bw} half-plane")
        if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise FormatError(f"{name}: frequency indices must be strictly increasing within each block")
        if not allow_nonfinite and not bool(np.isfinite(self.coefficients.astype(np.float32)).all()):
            raise NonFiniteError(f"{name}: coefficients contain NaN or Inf (refused; FORMAT §5.2)")

    def to_dense(self) -> np.ndarray:
        """FORMAT §5.3: the dense float32 delta."""
        return _kernel().reconstruct(self.shape, self.block, to_torch(self.indices), self.complex_coefficients(),
                                     self.scale).numpy()

    def spectral(self):
        """The kernel's view of this delta (``pisa_fft.Spectral``)."""
        return _kernel().Spectral(to_torch(self.indices), self.complex_coefficients(), self.scale)

    def delta_norm(self) -> float:
        """The Frobenius norm of :meth:`to_dense`, from the coefficients alone (no dense matrix)."""
        spectral = self.spectral()
        return math.sqrt(max(_kernel().delta_dot(self.shape, self.block, spectral, spectral), 0.0))

    def lines(self, dim: int, selected: np.ndarray, *, name: str) -> np.ndarray:
        """``to_dense().index_select(dim, selected)``, reconstructing only the blocks that hold those lines.

        Costs the touched block rows (or columns), within ``limits.MAX_DENSE``, never the whole target.
        """
        import torch

        gr, gc = self.grid
        k, size = self.k, self.block[dim]
        chosen = torch.as_tensor(np.asarray(selected, dtype=np.int64))
        touched, where = torch.unique(chosen // size, return_inverse=True)
        indices = to_torch(self.indices).reshape(gr, gc, k).index_select(dim, touched)
        values = self.complex_coefficients().reshape(gr, gc, k).index_select(dim, touched)
        n_rows, n_cols = indices.shape[:2]
        bh, bw = self.block
        limits.check_dense((n_rows * bh, n_cols * bw), name)
        blocks = _kernel().blocks(self.block, indices.reshape(-1, k), values.reshape(-1, k), torch.complex64)
        dense = blocks.reshape(n_rows, n_cols, bh, bw).permute(0, 2, 1, 3).reshape(n_rows * bh, n_cols * bw)
        dense = dense[:, : self.shape[1]] if dim == 0 else dense[: self.shape[0], :]
        return (dense.index_select(dim, where * size + chosen % size) * self.scale).numpy()

    def merged(self, weight: np.ndarray, *, subtract: bool = False) -> np.ndarray:
        """The whole merged (or unmerged) weight: cast_D(float32(W) +/- delta) (FORMAT §5.3).

        Goes a few block rows at a time (``pisa_fft.deltas``), each pass added to its weight rows and
        rounded into the result at once in torch, whose casts round to nearest-even as :func:`add_delta`
        does; a pass whose result is not finite is redone by :func:`add_delta`, so NaN and Inf come out with
        numpy's bits. No dense delta, and no float32 copy of the weight, is ever whole in memory.
        """
        import torch

        weight = as_array(weight)
        out = np.empty(weight.shape, dtype=weight.dtype)
        source, result = to_torch(weight), to_torch(out)
        for first, delta in _kernel().deltas(self.shape, self.block, to_torch(self.indices),
                                             self.complex_coefficients(), self.scale):
            rows = slice(first, first + delta.shape[0])
            wide = (torch.sub if subtract else torch.add)(source[rows], delta)  # float32: the weight widened exactly
            result[rows] = wide
            if not bool(torch.isfinite(result[rows]).all()):
                out[rows] = add_delta(weight[rows], delta.numpy(), subtract=subtract)
        return out

    def manifest_entry(self) -> dict[str, Any]:
        return {
            **self.extra,
            "shape": list(self.shape),
            "dtype": dtypes.name_of(self.dtype),
            "payload_dtype": dtypes.name_of(self.coefficients.dtype),
            "block": list(self.block),
            "grid": list(self.grid),
            "coefficients": self.k,
            "scale": self.scale,
        }

    def payload_tensors(self, name: str) -> dict[str, np.ndarray]:
        return {f"{name}.indices": self.indices.astype(np.int32),
                f"{name}.coefficients": np.ascontiguousarray(self.coefficients)}

    @staticmethod
    def payload_names(name: str, entry: dict[str, Any]) -> tuple[str, ...]:
        return f"{name}.indices", f"{name}.coefficients"

    @classmethod
    def from_manifest(cls, name: str, entry: dict[str, Any], tensors: dict[str, np.ndarray]) -> PISATarget:
        where = f"targets[{name!r}]"
        known = {"shape", "dtype", "payload_dtype", "block", "grid", "coefficients", "scale"}
        warn_unknown(entry, known, where)
        shape = require_shape(entry, "shape", where)
        dtype = require_dtype(entry, "dtype", where, dtypes.FLOAT_DTYPES)
        payload_dtype = require_dtype(entry, "payload_dtype", where, frozenset({"F32", "F16", "BF16"}))
        block = require_shape(entry, "block", where)
        grid = require_shape(entry, "grid", where)
        k = require(entry, "coefficients", int, where)
        scale = require(entry, "scale", (int, float), where)
        if len(block) != 2:
            raise ShapeError(f"{name}: block must be [bh, bw], got {list(block)}")
        if len(shape) != 2 or tuple(grid) != grid_of(shape, block):
            raise ShapeError(f"{name}: grid {list(grid)} does not match shape {list(shape)} and block {list(block)}")
        indices, coefficients = (tensors[n] for n in cls.payload_names(name, entry))
        if indices.dtype != np.int32:
            raise FormatError(f"{name}: payload indices must be I32, got {dtypes.name_of(indices.dtype)}")
        if dtypes.name_of(coefficients.dtype) != payload_dtype:
            raise FormatError(f"{name}: payload coefficients are {dtypes.name_of(coefficients.dtype)}, manifest says {payload_dtype}")
        if indices.ndim != 2 or indices.shape[1] != k:
            raise ShapeError(f"{name}: manifest says {k} coefficients per block, payload indices are {list(indices.shape)}")
        return cls(
            shape=shape,
            dtype=dtypes.to_numpy(dtype),
            block=(block[0], block[1]),
            indices=indices.astype(np.int64),
            coefficients=coefficients,
            scale=float(scale),
            extra={k_: v for k_, v in entry.items() if k_ not in known},
        )
