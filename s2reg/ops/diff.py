"""``diff``: how two adapters, or two checkpoints, differ.

Adapters: per tensor, the overlap of what they touch (Jaccard of the touched elements), and on the
common support the cosine similarity and relative L2 distance of their deltas. Checkpoints:
streamed one tensor pair at a time, which tensors, rows and columns differ, and by how much.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import BaseMismatch
from ..format import Adapter, S2FTTarget


def _support(target) -> torch.Tensor:
    """The elements a target touches, as a boolean mask of the full tensor."""
    if isinstance(target, S2FTTarget):
        mask = torch.zeros(target.shape, dtype=torch.bool)
        index = target.indices.long()
        if target.axis == "rows":
            mask[index] = True
        else:
            mask[:, index] = True
        return mask
    return torch.ones(target.shape, dtype=torch.bool)


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
        sa, sb = _support(ta), _support(tb)
        common = sa & sb
        da, db = ta.to_dense().double(), tb.to_dense().double()
        x, y = da[common], db[common]
        norm = float(x.norm() * y.norm())
        shared = bool(common.any())  # no common support: nothing to compare the deltas on
        rows.append({
            "tensor": name,
            "jaccard": float(common.sum()) / max(1, int((sa | sb).sum())),
            "common": int(common.sum()),
            "cosine": (float(x @ y) / norm if norm else float(torch.equal(x, y))) if shared else None,
            "relative_l2": (float((x - y).norm() / x.norm()) if float(x.norm()) else float(y.norm())) if shared else None,
            "equal": torch.equal(sa, sb) and torch.equal(da, db),
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
