"""``diff``: how two adapters, or two checkpoints, differ.

Adapters: per tensor, the overlap of what they touch (Jaccard of the touched elements), and on the
common support the cosine similarity and relative L2 distance of their deltas, all from the payloads:
two S2FT deltas on their slices, two PISA deltas by inner products of their coefficients (FORMAT
§5.3 and Parseval), a PISA delta against an S2FT one on the blocks holding the S2FT slice only. Checkpoints:
streamed one tensor pair at a time, which tensors, rows and columns differ, and by how much.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from ..errors import BaseMismatch
from ..format import Adapter, PISATarget, S2FTTarget, dtypes, limits
from ..format.arrays import bits, dot, read_array
from ..format.s2ft import axis_dim
from .diff_results import AdapterDiff, CheckpointDiff, DeltaComparison, OnlyIn, ShapeOrDtypeDiffers, ValueChange


def _slice_numel(target: S2FTTarget) -> int:
    """Elements of one selected row (or column): the tensor's size divided by its selected axis."""
    return math.prod(target.shape) // target.shape[axis_dim(target.axis)]


def _s2ft_overlap(ta: S2FTTarget, tb: S2FTTarget) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(common elements, union, a's and b's deltas on the common elements), from the slices alone."""
    if ta.axis == tb.axis:
        dim = axis_dim(ta.axis)
        _, pa, pb = np.intersect1d(ta.indices, tb.indices, assume_unique=True, return_indices=True)
        per = _slice_numel(ta)
        common = len(pa) * per
        x, y = np.take(ta.delta, pa, axis=dim), np.take(tb.delta, pb, axis=dim)
        return common, (ta.count + tb.count) * per - common, x, y
    rows, cols = (ta, tb) if ta.axis == "rows" else (tb, ta)
    common = rows.count * cols.count  # the crossing of the selected rows and the selected columns
    union = rows.count * rows.shape[1] + cols.count * cols.shape[0] - common
    on_rows = np.take(rows.delta, cols.indices, axis=1)
    on_cols = np.take(cols.delta, rows.indices, axis=0)
    return (common, union, on_rows, on_cols) if rows is ta else (common, union, on_cols, on_rows)


def _pisa_pair(name: str, ta: PISATarget, tb: PISATarget) -> tuple[int, int, float, float, float, float, bool]:
    """Two PISA deltas compared by inner products of their coefficients (same block), else densified (capped)."""
    numel = math.prod(ta.shape)
    if ta.block != tb.block:
        limits.check_dense(ta.shape, name)
        return (numel, numel, *_sums(ta.to_dense(), tb.to_dense()))
    from ..format.pisa_fft import delta_dot  # PISA reconstruction runs in torch

    sa, sb = ta.spectral(), tb.spectral()
    xx, yy, xy = (delta_dot(ta.shape, ta.block, p, q) for p, q in ((sa, sa), (sb, sb), (sa, sb)))
    same = (ta.scale == tb.scale and np.array_equal(ta.indices, tb.indices)
            and np.array_equal(ta.coefficients.astype(np.float32), tb.coefficients.astype(np.float32)))
    return numel, numel, xx, yy, xy, 0.0 if same else max(0.0, xx + yy - 2 * xy), same


def _sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, bool]:
    """x.x, y.y, x.y, |x - y|^2 and equality of two deltas on the same elements."""
    x, y = x.astype(np.float64).reshape(-1), y.astype(np.float64).reshape(-1)
    return dot(x, x), dot(y, y), dot(x, y), dot(x - y, x - y), bool(np.array_equal(x, y))


def _compare(name: str, ta, tb) -> tuple[int, int, float, float, float, float, bool]:
    """(common elements, union, x.x, y.y, x.y, |x - y|^2 on the common elements, equal there)."""
    if isinstance(ta, PISATarget) and isinstance(tb, PISATarget):
        return _pisa_pair(name, ta, tb)
    if isinstance(ta, S2FTTarget) and isinstance(tb, S2FTTarget):
        common, union, x, y = _s2ft_overlap(ta, tb)
        return (common, union, *_sums(x, y))
    # S2FT against PISA: the PISA delta on the S2FT slice, from the blocks holding it.
    s2ft, spectral = (ta, tb) if isinstance(ta, S2FTTarget) else (tb, ta)
    on_slice = spectral.lines(axis_dim(s2ft.axis), s2ft.indices, name=name)
    x, y = (s2ft.delta, on_slice) if s2ft is ta else (on_slice, s2ft.delta)
    return (s2ft.count * _slice_numel(s2ft), math.prod(ta.shape), *_sums(x, y))


def _natural(name: str) -> list:
    """Sort key putting layers.2 before layers.10: runs of digits compare as numbers (``re.split`` keeps them
    at the odd positions, so a number is only ever compared with a number)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def diff_adapters(a: Adapter, b: Adapter) -> AdapterDiff:
    """Per-tensor comparison; ``identical`` is true when every tensor's delta matches exactly."""
    rows: list[OnlyIn | DeltaComparison] = []
    for name in sorted(set(a.targets) | set(b.targets), key=_natural):
        ta, tb = a.targets.get(name), b.targets.get(name)
        if ta is None or tb is None:
            rows.append(OnlyIn(name, "a" if tb is None else "b"))
            continue
        if tuple(ta.shape) != tuple(tb.shape):
            raise BaseMismatch(f"{name}: the adapters disagree on its shape ({list(ta.shape)} vs {list(tb.shape)})")
        common, union, xx, yy, xy, dd, equal = _compare(name, ta, tb)
        shared = common > 0  # no common support: nothing to compare the deltas on
        norm = math.sqrt(xx * yy)
        rows.append(DeltaComparison(
            tensor=name,
            jaccard=common / max(1, union),
            common=common,
            cosine=(xy / norm if norm else float(equal)) if shared else None,
            relative_l2=(math.sqrt(dd / xx) if xx else math.sqrt(yy)) if shared else None,
            equal=common == union and equal,
        ))
    identical = a.kind == b.kind and all(isinstance(r, DeltaComparison) and r.equal for r in rows)
    return AdapterDiff(identical, (a.kind, b.kind), tuple(rows))


def _lines(mask: np.ndarray, dim: int) -> int:
    if mask.ndim < 2:
        return int(mask.any()) if dim else int(mask.sum())
    return int(mask.any(1 - dim).sum())


def diff_checkpoints(a, b, progress: Callable[[str], None] = lambda _: None) -> CheckpointDiff:
    """Which tensors, rows and columns of two checkpoints differ (bitwise), and by how much."""
    names_a, names_b = set(a.names()), set(b.names())
    rows: list[ShapeOrDtypeDiffers | ValueChange] = []
    for name in sorted(names_a & names_b, key=_natural):
        progress(name)
        if tuple(a.shape(name)) != tuple(b.shape(name)) or dtypes.name_of(a.dtype(name)) != dtypes.name_of(b.dtype(name)):
            rows.append(ShapeOrDtypeDiffers(name))
            continue
        if a.sha256_of(name) == b.sha256_of(name):
            continue
        x, y = read_array(a, name), read_array(b, name)
        changed = bits(x) != bits(y) if x.ndim else np.array(True)
        wide = x.astype(np.float64)
        delta = y.astype(np.float64) - wide
        norm, delta_norm = math.sqrt(dot(wide, wide)), math.sqrt(dot(delta, delta))
        rows.append(ValueChange(
            tensor=name,
            changed=int(changed.sum()),
            of=x.size,
            rows=_lines(changed, 0),
            columns=_lines(changed, 1) if x.ndim == 2 else None,
            max_abs=float(np.abs(delta).max()),
            relative_l2=delta_norm / norm if norm else delta_norm,
        ))
    return CheckpointDiff(not rows and names_a == names_b, tuple(sorted(names_a - names_b, key=_natural)),
                          tuple(sorted(names_b - names_a, key=_natural)), tuple(rows))
