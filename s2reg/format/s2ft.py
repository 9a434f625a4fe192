"""S2FT deltas (FORMAT §4): index lists plus dense slices, merged and unmerged exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import FormatError, NonFiniteError, ShapeError
from . import dtypes
from .manifest import require, require_dtype, require_shape, warn_unknown

AXES = ("rows", "columns")
DELTA_DTYPES = (torch.float32, torch.float64)  # narrowest first (FORMAT §4.3)
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def axis_dim(axis: str) -> int:
    return AXES.index(axis)


def take(weight: torch.Tensor, axis: str, indices: torch.Tensor) -> torch.Tensor:
    """The slice of ``weight`` that ``indices`` select on ``axis``."""
    return weight.index_select(axis_dim(axis), indices.to(torch.long))


def put(weight: torch.Tensor, axis: str, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` into the selected slice of ``weight`` in place."""
    weight.index_copy_(axis_dim(axis), indices.to(torch.long), values)


def add_exact(base: torch.Tensor, delta: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
    """FORMAT §4.3 merge (or, with ``subtract``, unmerge) of a slice: cast_D(cast_P(base) +/- delta).

    Elements whose delta is zero are returned untouched, so signed zeros survive.
    """
    wide = base.to(delta.dtype)
    moved = (wide - delta if subtract else wide + delta).to(base.dtype)
    return torch.where(delta == 0, base, moved)


def reversible(current: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether adding ``delta`` to ``current`` and subtracting it again gives ``current`` back bit for bit.

    Always true on the base the delta was taken against (§4.3); on top of another delta it may not be.
    """
    return _same_bits(add_exact(add_exact(current, delta), delta, subtract=True), current)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = _BITS[a.dtype]
    return bool(torch.equal(a.view(bits), b.view(bits)))


def exact_difference(base: torch.Tensor, tuned: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """``tuned - base`` in the narrowest of F32/F64 for which merge and unmerge are bit-exact (§4.3)."""
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ShapeError(f"{name}: base slice {tuple(base.shape)} {base.dtype} vs tuned {tuple(tuned.shape)} {tuned.dtype}")
    if base.dtype not in _BITS:
        raise FormatError(f"{name}: S2FT needs a float base tensor, got {base.dtype}")
    for wide in DELTA_DTYPES:
        if wide.itemsize < base.dtype.itemsize:
            continue
        delta = tuned.to(wide) - base.to(wide)
        if not torch.isfinite(delta).all():
            break
        if _same_bits(add_exact(base, delta), tuned) and _same_bits(add_exact(tuned, delta, subtract=True), base):
            return delta
    raise FormatError(
        f"{name}: the change cannot be stored as an exact difference (non-finite values, a signed-zero flip, "
        "or a jump of more than ~44 binades; FORMAT §4.3)"
    )


@dataclass(eq=False)
class S2FTTarget:
    """One tensor's S2FT delta: ``delta`` on the ``indices`` of ``axis`` (FORMAT §4.2)."""

    kind: ClassVar[str] = "s2ft"
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: str
    indices: torch.Tensor
    delta: torch.Tensor
    group_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    @property
    def num_params(self) -> int:
        return int(self.delta.numel())

    @property
    def groups(self) -> list[int] | None:
        """Selected group numbers (e.g. attention heads) when the target is grouped."""
        if self.group_size is None:
            return None
        return sorted({int(i) // self.group_size for i in self.indices.tolist()})

    def check(self, name: str, *, allow_nonfinite: bool = False) -> None:
        """Every rule of FORMAT §4.1-4.2; raises FormatError / ShapeError / NonFiniteError."""
        if self.axis not in AXES:
            raise FormatError(f"{name}: axis must be 'rows' or 'columns', got {self.axis!r}")
        if self.axis == "columns" and len(self.shape) != 2:
            raise ShapeError(f"{name}: axis 'columns' needs a rank-2 tensor, shape is {list(self.shape)}")
        if self.dtype not in _BITS:
            raise FormatError(f"{name}: S2FT needs a float base tensor, got {self.dtype}")
        if self.delta.dtype not in DELTA_DTYPES:
            raise FormatError(f"{name}: delta dtype must be F32 or F64, got {self.delta.dtype}")
        idx = self.indices
        if idx.dim() != 1 or idx.numel() == 0:
            raise ShapeError(f"{name}: indices must be a non-empty 1-D list, got shape {list(idx.shape)}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise FormatError(f"{name}: indices must be integers, got {idx.dtype}")
        length = self.shape[axis_dim(self.axis)]
        if int(idx.min()) < 0 or int(idx.max()) >= length:
            bad = int(idx.max()) if int(idx.max()) >= length else int(idx.min())
            raise ShapeError(f"{name}: index {bad} out of range for {self.axis} of length {length}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise FormatError(f"{name}: indices must be strictly increasing (sorted, no duplicates)")
        expected = list(self.shape)
        expected[axis_dim(self.axis)] = idx.numel()
        if list(self.delta.shape) != expected:
            raise ShapeError(f"{name}: delta shape {list(self.delta.shape)} does not match the slice shape {expected}")
        if self.group_size is not None:
            gs = self.group_size
            if gs < 1 or length % gs:
                raise ShapeError(f"{name}: group_size {gs} does not divide the {self.axis} length {length}")
            if idx.numel() % gs:  # before building groups, whose size is only declared
                raise FormatError(f"{name}: indices are not whole groups of {gs} (FORMAT §4.1 group_size)")
            groups = torch.unique(idx // gs)
            whole = (groups[:, None] * gs + torch.arange(gs)).reshape(-1)
            if not torch.equal(whole.to(idx.dtype), idx):
                raise FormatError(f"{name}: indices are not whole groups of {gs} (FORMAT §4.1 group_size)")
        if not allow_nonfinite and not bool(torch.isfinite(self.delta).all()):
            raise NonFiniteError(f"{name}: delta contains NaN or Inf (refused; FORMAT §4.2)")

    def to_dense(self) -> torch.Tensor:
        """FORMAT §4.4: the full-shape delta, zero off the selected slice."""
        dense = torch.zeros(self.shape, dtype=self.delta.dtype)
        put(dense, self.axis, self.indices, self.delta)
        return dense

    def merged_slice(self, weight: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
        """Only the selected slice of ``weight``, merged (or unmerged); exact per FORMAT §4.3."""
        return add_exact(take(weight, self.axis, self.indices), self.delta, subtract=subtract)

    def merged(self, weight: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
        """A merged (or unmerged) copy of the whole ``weight``; exact per FORMAT §4.3."""
        out = weight.clone()
        put(out, self.axis, self.indices, self.merged_slice(weight, subtract=subtract))
        return out

    def manifest_entry(self) -> dict[str, Any]:
        return {
            **self.extra,
            "shape": list(self.shape),
            "dtype": dtypes.name_of(self.dtype),
            "payload_dtype": dtypes.name_of(self.delta.dtype),
            "axis": self.axis,
            "count": self.count,
            "group_size": self.group_size,
        }

    def payload_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.indices": self.indices.to(torch.int32), f"{name}.delta": self.delta.contiguous()}

    @staticmethod
    def payload_names(name: str) -> tuple[str, ...]:
        return f"{name}.indices", f"{name}.delta"

    @classmethod
    def from_manifest(cls, name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> S2FTTarget:
        where = f"targets[{name!r}]"
        known = {"shape", "dtype", "payload_dtype", "axis", "count", "group_size"}
        warn_unknown(entry, known, where)
        shape = require_shape(entry, "shape", where)
        dtype = require_dtype(entry, "dtype", where, dtypes.FLOAT_DTYPES)
        payload_dtype = require_dtype(entry, "payload_dtype", where, frozenset({"F32", "F64"}))
        axis = require(entry, "axis", str, where)
        count = require(entry, "count", int, where)
        group_size = require(entry, "group_size", (int, type(None)), where)
        indices, delta = (tensors[n] for n in cls.payload_names(name))
        if indices.dtype != torch.int32:
            raise FormatError(f"{name}: payload indices must be I32, got {dtypes.name_of(indices.dtype)}")
        if dtypes.name_of(delta.dtype) != payload_dtype:
            raise FormatError(f"{name}: payload delta is {dtypes.name_of(delta.dtype)}, manifest says {payload_dtype}")
        if indices.numel() != count:
            raise ShapeError(f"{name}: manifest count {count} but the payload has {indices.numel()} indices")
        return cls(
            shape=shape,
            dtype=dtypes.to_torch(dtype),
            axis=axis,
            indices=indices.to(torch.int64),
            delta=delta,
            group_size=group_size,
            extra={k: v for k, v in entry.items() if k not in known},
        )
