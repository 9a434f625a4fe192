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
from ..format import Adapter, dtypes
from ..format.arrays import bits, dot, read_array
from ..format.s2ft import axis_dim
from .diff_results import AdapterDiff, CheckpointDiff, DeltaComparison, OnlyIn, ShapeOrDtypeDiffers, ValueChange
from ..kinds import kind_of, sums
from ..kinds.base import Comparison, dense_delta


def _compare(name: str, ta, tb) -> Comparison:
    """(common elements, union, x.x, y.y, x.y, |x - y|^2 on the common elements, equal there)."""
    kind_a, kind_b = kind_of(ta), kind_of(tb)
    if kind_a is kind_b:
        return kind_a.compare(name, ta, tb)
    # two kinds: on the rows or columns one of them rewrites, the other's delta there (PISA: from the blocks
    # holding them); neither rewriting a slice, their dense deltas (capped)
    for own, other in ((ta, tb), (tb, ta)):
        region = kind_of(own).region(own)
        if region is not None:
            axis, indices = region
            mine = kind_of(own).region_delta(own)
            theirs = kind_of(other).lines(other, axis_dim(axis), indices, name=name)
            x, y = (mine, theirs) if own is ta else (theirs, mine)
            return (mine.size, math.prod(ta.shape), *sums(x, y))
    numel = math.prod(ta.shape)
    return (numel, numel, *sums(dense_delta(ta, name), dense_delta(tb, name)))


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
