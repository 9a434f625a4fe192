"""``diff``: how two adapters, or two checkpoints, differ.

Adapters: per tensor, the overlap of what they touch (Jaccard of the touched elements), and on the
common support the cosine similarity and relative L2 distance of their deltas. Two S2FT deltas are
compared on their slices alone; a PISA delta touches everything and is densified, within
``limits.MAX_DENSE``. Checkpoints:
streamed one tensor pair at a time, which tensors, rows and columns differ, and by how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import BaseMismatch
from ..format import Adapter, S2FTTarget, limits
from ..format.s2ft import axis_dim


def _slice_numel(target: S2FTTarget) -> int:
    """Elements of one selected row (or column): the tensor's size divided by its selected axis."""
    return math.prod(target.shape) // target.shape[axis_dim(target.axis)]


def _s2ft_overlap(ta: S2FTTarget, tb: S2FTTarget) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(common elements, union, a's and b's deltas on the common elements), from the slices alone."""
    if ta.axis == tb.axis:
        dim = axis_dim(ta.axis)
        _, pa, pb = np.intersect1d(ta.indices.numpy(), tb.indices.numpy(), assume_unique=True, return_indices=True)
        per = _slice_numel(ta)
        common = len(pa) * per
        x = ta.delta.index_select(dim, torch.from_numpy(pa).long())
        y = tb.delta.index_select(dim, torch.from_numpy(pb).long())
        return common, (ta.count + tb.count) * per - common, x, y
    rows, cols = (ta, tb) if ta.axis == "rows" else (tb, ta)
    common = rows.count * cols.count  # the crossing of the selected rows and the selected columns
    union = rows.count * rows.shape[1] + cols.count * cols.shape[0] - common
    on_rows = rows.delta.index_select(1, cols.indices.long())
    on_cols = cols.delta.index_select(0, rows.indices.long())
    return (common, union, on_rows, on_cols) if rows is ta else (common, union, on_cols, on_rows)


def _values_on(target, narrow: S2FTTarget | None) -> torch.Tensor:
    """``target``'s delta on what ``narrow`` touches (everything when ``narrow`` is None)."""
    if target is narrow:
        return target.delta
    dense = target.to_dense()
    return dense if narrow is None else dense.index_select(axis_dim(narrow.axis), narrow.indices.long())


def _overlap(name: str, ta, tb) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    if isinstance(ta, S2FTTarget) and isinstance(tb, S2FTTarget):
        return _s2ft_overlap(ta, tb)
    # A PISA delta touches every element, and its values exist only densified: capped, as no base vouches here.
    limits.check_dense(ta.shape, name)
    narrow = next((t for t in (ta, tb) if isinstance(t, S2FTTarget)), None)
    numel = math.prod(ta.shape)
    common = numel if narrow is None else narrow.count * _slice_numel(narrow)
    return common, numel, _values_on(ta, narrow), _values_on(tb, narrow)


def diff_adapters(a: Adapter, b: Adapter) -> dict[str, Any]:
    """Per-tensor comparison; ``identical`` is true when every tensor's delta matches exactly."""
    rows = []
    for name in sorted(set(a.targets) | set(b.targets)):
        ta, tb = a.targets.get(name), b.targets.get(name)
        if ta is None or tb is None:
            rows.append({"tensor": name, "only_in": "a" if tb is None else "b"})
            continue
        if tuple(ta.shape) != tuple(tb.shape):
            raise BaseMismatch(f"{name}: the adapters disagree on its shape ({list(ta.shape)} vs {list(tb.shape)})")
        common, union, x, y = _overlap(name, ta, tb)
        x, y = x.double().reshape(-1), y.double().reshape(-1)
        norm = float(x.norm() * y.norm())
        shared = common > 0  # no common support: nothing to compare the deltas on
        rows.append({
            "tensor": name,
            "jaccard": common / max(1, union),
            "common": common,
            "cosine": (float(x @ y) / norm if norm else float(torch.equal(x, y))) if shared else None,
            "relative_l2": (float((x - y).norm() / x.norm()) if float(x.norm()) else float(y.norm())) if shared else None,
            "equal": common == union and torch.equal(x, y),
        })
    identical = a.kind == b.kind and all(r.get("equal") for r in rows)
    return {"identical": identical, "kinds": [a.kind, b.kind], "tensors": rows}


def _lines(mask: torch.Tensor, dim: int) -> int:
    if mask.dim() < 2:
        return int(mask.any()) if dim else int(mask.sum())
    return int(mask.any(1 - dim).sum())


def diff_checkpoints(a, b, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Which tensors, rows and columns of two checkpoints differ (bitwise), and by how much."""
    names_a, names_b = set(a.names()), set(b.names())
    rows = []
    for name in sorted(names_a & names_b):
        progress(name)
        if tuple(a.shape(name)) != tuple(b.shape(name)) or a.dtype(name) != b.dtype(name):
            rows.append({"tensor": name, "shape_or_dtype_differs": True})
            continue
        if a.sha256_of(name) == b.sha256_of(name):
            continue
        x, y = a.get(name), b.get(name)
        changed = x.view(torch.uint8).reshape(*x.shape, -1).ne(y.view(torch.uint8).reshape(*y.shape, -1)).any(-1) \
            if x.dim() else torch.tensor(True)
        delta = y.double() - x.double()
        rows.append({
            "tensor": name,
            "changed": int(changed.sum()),
            "of": x.numel(),
            "rows": _lines(changed, 0),
            "columns": _lines(changed, 1) if x.dim() == 2 else None,
            "max_abs": float(delta.abs().max()),
            "relative_l2": float(delta.norm() / x.double().norm()) if float(x.double().norm()) else float(delta.norm()),
        })
    return {"identical": not rows and names_a == names_b, "only_in_a": sorted(names_a - names_b),
            "only_in_b": sorted(names_b - names_a), "tensors": rows}
