"""S2FT deltas (FORMAT §4): index lists plus dense slices, merged and unmerged exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import FormatError, NonFiniteError, S2RegError, ShapeError
from . import dtypes
from .manifest import require, require_dtype, require_shape, warn_unknown

AXES = ("rows", "columns", "expert_rows", "expert_columns")
EXPERT_AXES = ("expert_rows", "expert_columns")  # FORMAT §4.5: a dimension inside each expert of a stacked tensor
DELTA_DTYPES = (torch.float32, torch.float64)  # narrowest first (FORMAT §4.3)
RESTORE_INDEX = torch.int64  # flat positions in a slice may exceed 2**31 (FORMAT §4.2)
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def axis_dim(axis: str) -> int:
    """The dimension of the slice (``T.delta``) along which the selected indices lie (FORMAT §4.2)."""
    return AXES.index(axis) % 2


def axis_length(shape: tuple[int, ...], axis: str) -> int:
    """How many indices ``axis`` has: a stored dimension, or experts x that dimension of each (FORMAT §4.5)."""
    if axis in EXPERT_AXES:
        return shape[0] * shape[1 + axis_dim(axis)]
    return shape[axis_dim(axis)]


def slice_shape(shape: tuple[int, ...], axis: str, count: int) -> tuple[int, ...]:
    """The shape of ``count`` selected slices (FORMAT §4.2): ``shape`` with the axis replaced by ``count``;
    for an expert axis, the shape of one expert with its dimension replaced by ``count``."""
    inner = list(shape[1:] if axis in EXPERT_AXES else shape)
    inner[axis_dim(axis)] = count
    return tuple(inner)


def _expert_coordinates(shape: tuple[int, ...], axis: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FORMAT §4.5: index ``i`` of an expert axis is index ``i % n`` of expert ``i // n`` (``n`` per expert)."""
    n = shape[1 + axis_dim(axis)]
    flat = indices.to(torch.long)
    return flat // n, flat % n


def take(weight: torch.Tensor, axis: str, indices: torch.Tensor) -> torch.Tensor:
    """The slice of ``weight`` that ``indices`` select on ``axis``."""
    if axis not in EXPERT_AXES:
        return weight.index_select(axis_dim(axis), indices.to(device=weight.device, dtype=torch.long))
    expert, index = (t.to(weight.device) for t in _expert_coordinates(tuple(weight.shape), axis, indices))
    if axis == "expert_rows":
        return weight[expert, index]
    return weight[expert, :, index].movedim(0, 1)


def put(weight: torch.Tensor, axis: str, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` into the selected slice of ``weight`` in place."""
    if axis not in EXPERT_AXES:
        weight.index_copy_(axis_dim(axis), indices.to(device=weight.device, dtype=torch.long), values)
        return
    expert, index = (t.to(weight.device) for t in _expert_coordinates(tuple(weight.shape), axis, indices))
    if axis == "expert_rows":
        weight[expert, index] = values
    else:
        weight[expert, :, index] = values.movedim(1, 0)


def gather(tensor: torch.Tensor, axis: str, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` with every index of ``axis`` replaced by the one ``index`` names (a full reordering)."""
    if axis not in EXPERT_AXES:
        return tensor.index_select(axis_dim(axis), index.to(device=tensor.device, dtype=torch.long))
    out = torch.empty_like(tensor)
    put(out, axis, torch.arange(index.numel()), take(tensor, axis, index))
    return out


def whole_groups(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Every index of the aligned groups of ``size`` that ``indices`` touch, sorted (FORMAT §4.1 group_size)."""
    groups = torch.unique(indices.to(torch.long) // size)
    return (groups[:, None] * size + torch.arange(size)).reshape(-1)


def add_exact(base: torch.Tensor, delta: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
    """The arithmetic rule of FORMAT §4.3 on a slice: cast_D(cast_P(base) +/- delta).

    Elements whose delta is zero are returned untouched, so signed zeros survive.
    """
    wide = base.to(delta.dtype)
    moved = (wide - delta if subtract else wide + delta).to(base.dtype)
    return torch.where(delta == 0, base, moved)


@dataclass(eq=False)
class Restore:
    """FORMAT §4.3 restore list: slice elements whose bits the arithmetic rule cannot produce.

    ``index`` holds flat (row-major) positions in the slice, strictly increasing; ``base`` and
    ``tuned`` their exact values (in the base dtype) before and after fine-tuning. Merge writes
    ``tuned`` there after the arithmetic, unmerge writes ``base``.
    """

    index: torch.Tensor
    base: torch.Tensor
    tuned: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.index.numel())

    def check(self, name: str, slice_numel: int, dtype: torch.dtype) -> None:
        idx = self.index
        if idx.dim() != 1 or idx.numel() == 0 or idx.dtype not in (torch.int32, torch.int64):
            raise FormatError(f"{name}: restore list must be a non-empty 1-D integer list, got {list(idx.shape)} {idx.dtype}")
        if int(idx.min()) < 0 or int(idx.max()) >= slice_numel:
            raise ShapeError(f"{name}: restore position out of range for a slice of {slice_numel} elements")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise FormatError(f"{name}: restore positions must be strictly increasing (FORMAT §4.3)")
        for values in (self.base, self.tuned):
            if values.dtype != dtype or tuple(values.shape) != (idx.numel(),):
                raise FormatError(f"{name}: restore values must be {idx.numel()} {dtypes.name_of(dtype)} values, got "
                                  f"{list(values.shape)} {dtypes.name_of(values.dtype)}")

    def write(self, out: torch.Tensor, *, subtract: bool) -> None:
        """Overwrite the listed elements of the contiguous slice ``out`` with their base (unmerge) or tuned bits."""
        out.view(-1).index_copy_(0, self.index.to(device=out.device, dtype=torch.long),
                                 (self.base if subtract else self.tuned).to(out.device))

    def moved(self, dim: int, old_shape: tuple[int, ...], positions: torch.Tensor, new_shape: tuple[int, ...]) -> Restore:
        """The same entries in a slice whose axis ``dim`` is rearranged: old position j goes to ``positions[j]``."""
        coords = list(torch.unravel_index(self.index.long(), old_shape))
        coords[dim] = positions.long()[coords[dim]]
        flat = torch.zeros_like(coords[0])
        for c, size in zip(coords, new_shape):
            flat = flat * size + c
        order = flat.argsort()
        return Restore(flat[order], self.base[order], self.tuned[order])


def apply_slice(current: torch.Tensor, delta: torch.Tensor, restore: Restore | None = None, *,
                subtract: bool = False) -> torch.Tensor:
    """FORMAT §4.3 merge (or, with ``subtract``, unmerge) of a slice: the arithmetic rule, then the restore list."""
    out = add_exact(current, delta, subtract=subtract).contiguous()
    if restore is not None:
        restore.write(out, subtract=subtract)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(_bits(a), _bits(b)))


def exact_difference(base: torch.Tensor, tuned: torch.Tensor, *, name: str = "tensor") -> tuple[torch.Tensor, Restore | None]:
    """``tuned - base`` as stored by FORMAT §4.3: the delta and, only where needed, a restore list.

    The narrowest of F32/F64 for which the arithmetic rule alone is bit-exact wins, with no restore
    list (so adapters that never needed one keep their bytes). If none is, the elements the
    arithmetic gets wrong (signed-zero flips, jumps of many binades, a non-finite base value) are
    listed with their exact bits, and the delta dtype giving the smaller payload is used.
    """
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ShapeError(f"{name}: base slice {tuple(base.shape)} {base.dtype} vs tuned {tuple(tuned.shape)} {tuned.dtype}")
    if base.dtype not in _BITS:
        raise FormatError(f"{name}: S2FT needs a float base tensor, got {base.dtype}")
    changed = _bits(base) != _bits(tuned)
    if bool((changed & ~torch.isfinite(tuned)).any()):
        raise NonFiniteError(f"{name}: the fine-tuned values hold NaN/Inf where the base differs (refused; FORMAT §4.2)")
    best = None
    for wide in DELTA_DTYPES:
        if wide.itemsize < base.dtype.itemsize:
            continue
        delta = torch.where(changed, tuned.to(wide) - base.to(wide), 0.0)
        delta = torch.where(torch.isfinite(delta), delta, 0.0)  # an infinite base value or an F32 overflow: listed below
        wrong = (_bits(add_exact(base, delta)) != _bits(tuned)) | (_bits(add_exact(tuned, delta, subtract=True)) != _bits(base))
        if not bool(wrong.any()):
            return delta, None
        listed = int(wrong.sum())
        cost = delta.numel() * wide.itemsize + listed * (RESTORE_INDEX.itemsize + 2 * base.dtype.itemsize)
        if best is None or cost < best[0]:
            best = (cost, delta, wrong)
    _, delta, wrong = best
    flat = wrong.reshape(-1)
    index = flat.nonzero().reshape(-1)
    return delta, Restore(index, base.reshape(-1)[index], tuned.reshape(-1)[index])


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
    restore: Restore | None = None

    @property
    def format_version(self) -> int:
        """The lowest format version that can hold this target: restore lists came with version 2, expert axes
        with version 3 (§3.6)."""
        return 3 if self.axis in EXPERT_AXES else 1 if self.restore is None else 2

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
            raise FormatError(f"{name}: axis must be one of {', '.join(AXES)}, got {self.axis!r}")
        rank = {"columns": (2,), "expert_rows": (2, 3), "expert_columns": (3,)}.get(self.axis)
        if rank is not None and len(self.shape) not in rank:
            raise ShapeError(f"{name}: axis {self.axis!r} needs a rank-{' or '.join(map(str, rank))} tensor, "
                             f"shape is {list(self.shape)}")
        if self.dtype not in _BITS:
            raise FormatError(f"{name}: S2FT needs a float base tensor, got {self.dtype}")
        if self.delta.dtype not in DELTA_DTYPES:
            raise FormatError(f"{name}: delta dtype must be F32 or F64, got {self.delta.dtype}")
        idx = self.indices
        if idx.dim() != 1 or idx.numel() == 0:
            raise ShapeError(f"{name}: indices must be a non-empty 1-D list, got shape {list(idx.shape)}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise FormatError(f"{name}: indices must be integers, got {idx.dtype}")
        length = axis_length(self.shape, self.axis)
        if int(idx.min()) < 0 or int(idx.max()) >= length:
            bad = int(idx.max()) if int(idx.max()) >= length else int(idx.min())
            raise ShapeError(f"{name}: index {bad} out of range for {self.axis} of length {length}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise FormatError(f"{name}: indices must be strictly increasing (sorted, no duplicates)")
        expected = list(slice_shape(self.shape, self.axis, idx.numel()))
        if list(self.delta.shape) != expected:
            raise ShapeError(f"{name}: delta shape {list(self.delta.shape)} does not match the slice shape {expected}")
        if self.group_size is not None:
            gs = self.group_size
            per_expert = self.shape[1 + axis_dim(self.axis)] if self.axis in EXPERT_AXES else length
            if gs < 1 or per_expert % gs:  # groups never straddle two experts (FORMAT §4.5)
                raise ShapeError(f"{name}: group_size {gs} does not divide the {self.axis} length {per_expert}")
            if idx.numel() % gs:  # before building groups, whose size is only declared
                raise FormatError(f"{name}: indices are not whole groups of {gs} (FORMAT §4.1 group_size)")
            if not torch.equal(whole_groups(idx, gs).to(idx.dtype), idx):
                raise FormatError(f"{name}: indices are not whole groups of {gs} (FORMAT §4.1 group_size)")
        if not allow_nonfinite and not bool(torch.isfinite(self.delta).all()):
            raise NonFiniteError(f"{name}: delta contains NaN or Inf (refused; FORMAT §4.2)")
        if self.restore is not None:
            self.restore.check(name, self.delta.numel(), self.dtype)

    def to_dense(self) -> torch.Tensor:
        """FORMAT §4.4: the full-shape delta, zero off the selected slice."""
        dense = torch.zeros(self.shape, dtype=self.delta.dtype)
        put(dense, self.axis, self.indices, self.delta)
        return dense

    def shifted(self, current: torch.Tensor, *, subtract: bool = False, name: str = "tensor",
                check_reversible: bool = False) -> torch.Tensor:
        """The selected slice values ``current`` merged (or unmerged); exact per FORMAT §4.3 on the delta's base.

        With ``check_reversible`` (for values that may not be the delta's base: another adapter merged
        first, or a merge without the base check), a merge that unmerging could not undo bit for bit is refused.
        """
        out = apply_slice(current, self.delta.to(current.device), self.restore, subtract=subtract)
        if check_reversible and not subtract and not self.undoes(current, out):
            raise S2RegError(
                f"{name}: this adapter could not be unmerged exactly from these values (it overlaps one merged before "
                "it, or they are not the values it was made for); combine overlapping adapters with `s2reg fuse`"
            )
        return out

    def undoes(self, current: torch.Tensor, merged: torch.Tensor) -> bool:
        """Whether unmerging from ``merged`` (this delta merged onto ``current``) gives ``current`` back bit for bit."""
        return _same_bits(apply_slice(merged, self.delta.to(merged.device), self.restore, subtract=True), current)

    def reversible(self, current: torch.Tensor) -> bool:
        """Whether merging onto the slice values ``current`` and unmerging again gives them back bit for bit.

        Always true on the base the delta was taken against (§4.3); on other values (another adapter
        merged first, or a merge onto a different tensor without the base check) it may not be.
        """
        return self.undoes(current, self.shifted(current))

    def merged_slice(self, weight: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
        """Only the selected slice of ``weight``, merged (or unmerged); exact per FORMAT §4.3."""
        return self.shifted(take(weight, self.axis, self.indices), subtract=subtract)

    def merged(self, weight: torch.Tensor, *, subtract: bool = False) -> torch.Tensor:
        """A merged (or unmerged) copy of the whole ``weight``; exact per FORMAT §4.3."""
        out = weight.clone()
        put(out, self.axis, self.indices, self.merged_slice(weight, subtract=subtract))
        return out

    def reordered(self, indices: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor) -> S2FTTarget:
        """This target with new ``indices`` and slice ``delta``, where old slice position j is now ``positions[j]``.

        The restore list follows its elements (used by permutation and by fusion onto a union of indices).
        """
        restore = None
        if self.restore is not None:
            dim = axis_dim(self.axis)
            restore = self.restore.moved(dim, tuple(self.delta.shape), positions, tuple(delta.shape))
        return S2FTTarget(self.shape, self.dtype, self.axis, indices, delta, self.group_size, dict(self.extra), restore)

    def manifest_entry(self) -> dict[str, Any]:
        listed = {} if self.restore is None else {"restore": self.restore.count}
        return {
            **self.extra,
            **listed,
            "shape": list(self.shape),
            "dtype": dtypes.name_of(self.dtype),
            "payload_dtype": dtypes.name_of(self.delta.dtype),
            "axis": self.axis,
            "count": self.count,
            "group_size": self.group_size,
        }

    def payload_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.indices": self.indices.to(torch.int32), f"{name}.delta": self.delta.contiguous()}
        if self.restore is not None:
            tensors[f"{name}.restore"] = self.restore.index.to(RESTORE_INDEX)
            tensors[f"{name}.restore_values"] = torch.stack([self.restore.base, self.restore.tuned], dim=1)
        return tensors

    @staticmethod
    def payload_names(name: str, entry: dict[str, Any]) -> tuple[str, ...]:
        listed = (f"{name}.restore", f"{name}.restore_values") if "restore" in entry else ()
        return (f"{name}.indices", f"{name}.delta", *listed)

    @classmethod
    def from_manifest(cls, name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> S2FTTarget:
        where = f"targets[{name!r}]"
        known = {"shape", "dtype", "payload_dtype", "axis", "count", "group_size", "restore"}
        warn_unknown(entry, known, where)
        shape = require_shape(entry, "shape", where)
        dtype = require_dtype(entry, "dtype", where, dtypes.FLOAT_DTYPES)
        payload_dtype = require_dtype(entry, "payload_dtype", where, frozenset({"F32", "F64"}))
        axis = require(entry, "axis", str, where)
        count = require(entry, "count", int, where)
        group_size = require(entry, "group_size", (int, type(None)), where)
        listed = require(entry, "restore", int, where) if "restore" in entry else None
        indices, delta, *restore = (tensors[n] for n in cls.payload_names(name, entry))
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
            restore=None if listed is None else _restore_from_payload(name, listed, dtype, *restore),
        )


def _restore_from_payload(name: str, count: int, dtype: str, index: torch.Tensor, values: torch.Tensor) -> Restore:
    """FORMAT §4.2: ``T.restore`` (I64 [n]) and ``T.restore_values`` (base dtype [n, 2]: base, tuned)."""
    if index.dtype != RESTORE_INDEX:
        raise FormatError(f"{name}: payload restore positions must be I64, got {dtypes.name_of(index.dtype)}")
    if dtypes.name_of(values.dtype) != dtype or list(values.shape) != [index.numel(), 2]:
        raise FormatError(f"{name}: payload restore_values must be [{index.numel()}, 2] {dtype}, got "
                          f"{list(values.shape)} {dtypes.name_of(values.dtype)}")
    if index.numel() != count:
        raise ShapeError(f"{name}: manifest restore {count} but the payload lists {index.numel()} elements")
    return Restore(index, values[:, 0].contiguous(), values[:, 1].contiguous())
