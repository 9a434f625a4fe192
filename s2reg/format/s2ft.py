"""S2FT deltas (FORMAT §4): index lists plus dense slices, merged and unmerged exactly.

Arrays are numpy (bfloat16 from ml_dtypes), so merging never needs torch. Casting back into the
base dtype rounds to nearest-even directly from the payload dtype, as §4.3 says (numpy and
ml_dtypes cast F64 -> F16 in one rounding, where torch goes through F32 first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import FormatError, NonFiniteError, S2RegError, ShapeError
from . import dtypes
from .arrays import as_array, bits, unique
from .manifest import require, require_dtype, require_shape, warn_unknown

AXES = ("rows", "columns", "expert_rows", "expert_columns")
EXPERT_AXES = ("expert_rows", "expert_columns")  # FORMAT §4.5: a dimension inside each expert of a stacked tensor
DELTA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # narrowest first (FORMAT §4.3)
RESTORE_INDEX = np.dtype(np.int64)  # flat positions in a slice may exceed 2**31 (FORMAT §4.2)
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


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


def _expert_coordinates(shape: tuple[int, ...], axis: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FORMAT §4.5: index ``i`` of an expert axis is index ``i % n`` of expert ``i // n`` (``n`` per expert)."""
    n = shape[1 + axis_dim(axis)]
    return np.divmod(np.asarray(indices, dtype=np.int64), n)


def take(weight: np.ndarray, axis: str, indices: np.ndarray) -> np.ndarray:
    """The slice of ``weight`` that ``indices`` select on ``axis`` (a copy)."""
    if axis not in EXPERT_AXES:
        return np.take(weight, np.asarray(indices, dtype=np.int64), axis=axis_dim(axis))
    expert, index = _expert_coordinates(weight.shape, axis, indices)
    if axis == "expert_rows":
        return weight[expert, index]
    return np.moveaxis(weight[expert, :, index], 0, 1)  # the fibres W[e, :, k] as columns


def put(weight: np.ndarray, axis: str, indices: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` into the selected slice of ``weight`` in place."""
    if axis not in EXPERT_AXES:
        index = np.asarray(indices, dtype=np.int64)
        if axis_dim(axis) == 0:
            weight[index] = values
        else:
            weight[:, index] = values
        return
    expert, index = _expert_coordinates(weight.shape, axis, indices)
    if axis == "expert_rows":
        weight[expert, index] = values
    else:
        weight[expert, :, index] = np.moveaxis(values, 1, 0)


def gather(array: np.ndarray, axis: str, index: np.ndarray) -> np.ndarray:
    """``array`` with every index of ``axis`` replaced by the one ``index`` names (a full reordering)."""
    if axis not in EXPERT_AXES:
        return take(array, axis, index)
    out = np.empty_like(array)
    put(out, axis, np.arange(len(index)), take(array, axis, index))
    return out


def whole_groups(indices: np.ndarray, size: int) -> np.ndarray:
    """Every index of the aligned groups of ``size`` that ``indices`` touch, sorted (FORMAT §4.1 group_size)."""
    groups = unique(np.asarray(indices, dtype=np.int64) // size)
    return (groups[:, None] * size + np.arange(size)).reshape(-1)


def add_exact(base: np.ndarray, delta: np.ndarray, *, subtract: bool = False) -> np.ndarray:
    """The arithmetic rule of FORMAT §4.3 on a slice: cast_D(cast_P(base) +/- delta).

    Elements whose delta is zero are returned untouched, so signed zeros survive.
    """
    base, delta = as_array(base), as_array(delta)
    with np.errstate(all="ignore"):  # an overflow to Inf is a value here; callers refuse it where it matters
        wide = base.astype(delta.dtype)
        moved = (wide - delta if subtract else wide + delta).astype(base.dtype)
    return np.where(delta == 0, base, moved)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(bits(a), bits(b)))


@dataclass(eq=False)
class Restore:
    """FORMAT §4.3 restore list: slice elements whose bits the arithmetic rule cannot produce.

    ``index`` holds flat (row-major) positions in the slice, strictly increasing; ``base`` and
    ``tuned`` their exact values (in the base dtype) before and after fine-tuning. Merge writes
    ``tuned`` there after the arithmetic, unmerge writes ``base``.
    """

    index: np.ndarray
    base: np.ndarray
    tuned: np.ndarray

    def __post_init__(self) -> None:
        self.index, self.base, self.tuned = as_array(self.index), as_array(self.base), as_array(self.tuned)

    @property
    def count(self) -> int:
        return int(self.index.size)

    def check(self, name: str, slice_numel: int, dtype: np.dtype) -> None:
        idx = self.index
        if idx.ndim != 1 or idx.size == 0 or idx.dtype not in INDEX_DTYPES:
            raise FormatError(f"{name}: restore list must be a non-empty 1-D integer list, got {list(idx.shape)} {idx.dtype}")
        if int(idx.min()) < 0 or int(idx.max()) >= slice_numel:
            raise ShapeError(f"{name}: restore position out of range for a slice of {slice_numel} elements")
        if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise FormatError(f"{name}: restore positions must be strictly increasing (FORMAT §4.3)")
        for values in (self.base, self.tuned):
            if values.dtype != dtype or tuple(values.shape) != (idx.size,):
                raise FormatError(f"{name}: restore values must be {idx.size} {dtypes.name_of(dtype)} values, got "
                                  f"{list(values.shape)} {dtypes.name_of(values.dtype)}")

    def write(self, out: np.ndarray, *, subtract: bool) -> None:
        """Overwrite the listed elements of the contiguous slice ``out`` with their base (unmerge) or tuned bits."""
        out.reshape(-1)[self.index.astype(np.int64)] = self.base if subtract else self.tuned

    def moved(self, dim: int, old_shape: tuple[int, ...], positions: np.ndarray, new_shape: tuple[int, ...]) -> Restore:
        """The same entries in a slice whose axis ``dim`` is rearranged: old position j goes to ``positions[j]``."""
        coords = list(np.unravel_index(self.index.astype(np.int64), old_shape))
        coords[dim] = np.asarray(positions, dtype=np.int64)[coords[dim]]
        flat = np.ravel_multi_index(tuple(coords), new_shape).astype(np.int64)
        order = np.argsort(flat, kind="stable")
        return Restore(flat[order], self.base[order], self.tuned[order])


def apply_slice(current: np.ndarray, delta: np.ndarray, restore: Restore | None = None, *,
                subtract: bool = False) -> np.ndarray:
    """FORMAT §4.3 merge (or, with ``subtract``, unmerge) of a slice: the arithmetic rule, then the restore list."""
    out = np.ascontiguousarray(add_exact(current, delta, subtract=subtract))
    if restore is not None:
        restore.write(out, subtract=subtract)
    return out


def exact_difference(base: np.ndarray, tuned: np.ndarray, *, name: str = "tensor") -> tuple[np.ndarray, Restore | None]:
    """``tuned - base`` as stored by FORMAT §4.3: the delta and, only where needed, a restore list.

    The narrowest of F32/F64 for which the arithmetic rule alone is bit-exact wins, with no restore
    list (so adapters that never needed one keep their bytes). If none is, the elements the
    arithmetic gets wrong (signed-zero flips, jumps of many binades, a non-finite base value) are
    listed with their exact bits, and the delta dtype giving the smaller payload is used.
    """
    base, tuned = as_array(base), as_array(tuned)
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ShapeError(f"{name}: base slice {tuple(base.shape)} {base.dtype} vs tuned {tuple(tuned.shape)} {tuned.dtype}")
    if not _is_float(base.dtype):
        raise FormatError(f"{name}: S2FT needs a float base tensor, got {base.dtype}")
    changed = bits(base) != bits(tuned)
    if bool((changed & ~np.isfinite(tuned)).any()):
        raise NonFiniteError(f"{name}: the fine-tuned values hold NaN/Inf where the base differs (refused; FORMAT §4.2)")
    best: tuple[int, np.ndarray, np.ndarray] | None = None
    for wide in DELTA_DTYPES:
        if wide.itemsize < base.dtype.itemsize:
            continue
        with np.errstate(all="ignore"):
            delta = np.where(changed, tuned.astype(wide) - base.astype(wide), wide.type(0))
        delta = np.where(np.isfinite(delta), delta, wide.type(0))  # an infinite base value or an F32 overflow: listed below
        wrong = (bits(add_exact(base, delta)) != bits(tuned)) | (bits(add_exact(tuned, delta, subtract=True)) != bits(base))
        if not bool(wrong.any()):
            return delta, None
        listed = int(wrong.sum())
        cost = delta.size * wide.itemsize + listed * (RESTORE_INDEX.itemsize + 2 * base.dtype.itemsize)
        if best is None or cost < best[0]:
            best = (cost, delta, wrong)
    assert best is not None, "F64 is at least as wide as every float dtype"
    _, delta, wrong = best
    index = np.flatnonzero(wrong).astype(np.int64)
    return delta, Restore(index, base.reshape(-1)[index], tuned.reshape(-1)[index])


def _is_float(dtype: np.dtype) -> bool:
    try:
        return dtypes.name_of(dtype) in dtypes.FLOAT_DTYPES
    except FormatError:
        return False


@dataclass(eq=False)
class S2FTTarget:
    """One tensor's S2FT delta: ``delta`` on the ``indices`` of ``axis`` (FORMAT §4.2)."""

    kind: ClassVar[str] = "s2ft"
    shape: tuple[int, ...]
    dtype: np.dtype
    axis: str
    indices: np.ndarray
    delta: np.ndarray
    group_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    restore: Restore | None = None

    def __post_init__(self) -> None:  # torch tensors and dtypes are taken too (training hands them in)
        self.dtype = dtypes.to_numpy(dtypes.name_of(self.dtype))
        self.indices, self.delta = as_array(self.indices), as_array(self.delta)

    @property
    def format_version(self) -> int:
        """The lowest format version that can hold this target: restore lists came with version 2, expert axes
        with version 3 (§3.6)."""
        return 3 if self.axis in EXPERT_AXES else 1 if self.restore is None else 2

    @property
    def count(self) -> int:
        return int(self.indices.size)

    @property
    def num_params(self) -> int:
        return int(self.delta.size)

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
        if not _is_float(self.dtype):
            raise FormatError(f"{name}: S2FT needs a float base tensor, got {self.dtype}")
        if self.delta.dtype not in DELTA_DTYPES:
            raise FormatError(f"{name}: delta dtype must be F32 or F64, got {self.delta.dtype}")
        idx = self.indices
        if idx.ndim != 1 or idx.size == 0:
            raise ShapeError(f"{name}: indices must be a non-empty 1-D list, got shape {list(idx.shape)}")
        if idx.dtype not in INDEX_DTYPES:
            raise FormatError(f"{name}: indices must be integers, got {idx.dtype}")
        length = axis_length(self.shape, self.axis)
        if int(idx.min()) < 0 or int(idx.max()) >= length:
            bad = int(idx.max()) if int(idx.max()) >= length else int(idx.min())
            raise ShapeError(f"{name}: index {bad} out of range for {self.axis} of length {length}")
        if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise FormatError(f"{name}: indices must be strictly increasing (sorted, no duplicates)")
        expected = list(slice_shape(self.shape, self.axis, idx.size))
        if list(self.delta.shape) != expected:
            raise ShapeError(f"{name}: delta shape {list(self.delta.shape)} does not match the slice shape {expected}")
        if self.group_size is not None:
            gs = self.group_size
            per_expert = self.shape[1 + axis_dim(self.axis)] if self.axis in EXPERT_AXES else length
            if gs < 1 or per_expert % gs:  # groups never straddle two experts (FORMAT §4.5)
                raise ShapeError(f"{name}: group_size {gs} does not divide the {self.axis} length {per_expert}")
            if idx.size % gs:  # before building groups, whose size is only declared
                raise FormatError(f"{name}: indices are not whole groups of {gs} (FORMAT §4.1 group_size)")
            if not np.array_equal(whole_groups(idx, gs), idx):
                raise FormatError(f"{name}: indices are not whole groups of {gs} (FORMAT §4.1 group_size)")
        if not allow_nonfinite and not bool(np.isfinite(self.delta).all()):
            raise NonFiniteError(f"{name}: delta contains NaN or Inf (refused; FORMAT §4.2)")
        if self.restore is not None:
            self.restore.check(name, self.delta.size, self.dtype)

    def to_dense(self) -> np.ndarray:
        """FORMAT §4.4: the full-shape delta, zero off the selected slice."""
        dense = np.zeros(self.shape, dtype=self.delta.dtype)
        put(dense, self.axis, self.indices, self.delta)
        return dense

    def shifted(self, current: np.ndarray, *, subtract: bool = False, name: str = "tensor",
                check_reversible: bool = False) -> np.ndarray:
        """The selected slice values ``current`` merged (or unmerged); exact per FORMAT §4.3 on the delta's base.

        With ``check_reversible`` (for values that may not be the delta's base: another adapter merged
        first, or a merge without the base check), a merge that unmerging could not undo bit for bit is refused.
        """
        current = as_array(current)
        out = apply_slice(current, self.delta, self.restore, subtract=subtract)
        if check_reversible and not subtract and not self.undoes(current, out):
            raise S2RegError(
                f"{name}: this adapter could not be unmerged exactly from these values (it overlaps one merged before "
                "it, or they are not the values it was made for); combine overlapping adapters with `s2reg fuse`"
            )
        return out

    def undoes(self, current: np.ndarray, merged: np.ndarray) -> bool:
        """Whether unmerging from ``merged`` (this delta merged onto ``current``) gives ``current`` back bit for bit."""
        return _same_bits(apply_slice(as_array(merged), self.delta, self.restore, subtract=True), as_array(current))

    def reversible(self, current: np.ndarray) -> bool:
        """Whether merging onto the slice values ``current`` and unmerging again gives them back bit for bit.

        Always true on the base the delta was taken against (§4.3); on other values (another adapter
        merged first, or a merge onto a different tensor without the base check) it may not be.
        """
        return self.undoes(current, self.shifted(current))

    def merged_slice(self, weight: np.ndarray, *, subtract: bool = False) -> np.ndarray:
        """Only the selected slice of ``weight``, merged (or unmerged); exact per FORMAT §4.3."""
        return self.shifted(take(as_array(weight), self.axis, self.indices), subtract=subtract)

    def merged(self, weight: np.ndarray, *, subtract: bool = False) -> np.ndarray:
        """A merged (or unmerged) copy of the whole ``weight``; exact per FORMAT §4.3."""
        weight = as_array(weight)
        out = weight.copy()
        put(out, self.axis, self.indices, self.merged_slice(weight, subtract=subtract))
        return out

    def reordered(self, indices: np.ndarray, positions: np.ndarray, delta: np.ndarray) -> S2FTTarget:
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

    def payload_tensors(self, name: str) -> dict[str, np.ndarray]:
        tensors = {f"{name}.indices": self.indices.astype(np.int32), f"{name}.delta": np.ascontiguousarray(self.delta)}
        if self.restore is not None:
            tensors[f"{name}.restore"] = self.restore.index.astype(RESTORE_INDEX)
            tensors[f"{name}.restore_values"] = np.stack([self.restore.base, self.restore.tuned], axis=1)
        return tensors

    @staticmethod
    def payload_names(name: str, entry: dict[str, Any]) -> tuple[str, ...]:
        listed = (f"{name}.restore", f"{name}.restore_values") if "restore" in entry else ()
        return (f"{name}.indices", f"{name}.delta", *listed)

    @classmethod
    def from_manifest(cls, name: str, entry: dict[str, Any], tensors: dict[str, np.ndarray]) -> S2FTTarget:
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
        if indices.dtype != np.int32:
            raise FormatError(f"{name}: payload indices must be I32, got {dtypes.name_of(indices.dtype)}")
        if dtypes.name_of(delta.dtype) != payload_dtype:
            raise FormatError(f"{name}: payload delta is {dtypes.name_of(delta.dtype)}, manifest says {payload_dtype}")
        if indices.size != count:
            raise ShapeError(f"{name}: manifest count {count} but the payload has {indices.size} indices")
        return cls(
            shape=shape,
            dtype=dtypes.to_numpy(dtype),
            axis=axis,
            indices=indices.astype(np.int64),
            delta=delta,
            group_size=group_size,
            extra={k: v for k, v in entry.items() if k not in known},
            restore=None if listed is None else _restore_from_payload(name, listed, dtype, *restore),
        )


def _restore_from_payload(name: str, count: int, dtype: str, index: np.ndarray, values: np.ndarray) -> Restore:
    """FORMAT §4.2: ``T.restore`` (I64 [n]) and ``T.restore_values`` (base dtype [n, 2]: base, tuned)."""
    if index.dtype != RESTORE_INDEX:
        raise FormatError(f"{name}: payload restore positions must be I64, got {dtypes.name_of(index.dtype)}")
    if dtypes.name_of(values.dtype) != dtype or list(values.shape) != [index.size, 2]:
        raise FormatError(f"{name}: payload restore_values must be [{index.size}, 2] {dtype}, got "
                          f"{list(values.shape)} {dtypes.name_of(values.dtype)}")
    if index.size != count:
        raise ShapeError(f"{name}: manifest restore {count} but the payload lists {index.size} elements")
    return Restore(index, np.ascontiguousarray(values[:, 0]), np.ascontiguousarray(values[:, 1]))
