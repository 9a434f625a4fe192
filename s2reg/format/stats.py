"""Per-target statistics of an adapter, for ``inspect`` and ``Adapter.stats()``.

Every number comes from the payload: a target is never densified, so a tiny adapter that declares
a huge tensor costs what its payload costs.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from . import codec, dtypes

if TYPE_CHECKING:
    from .adapter import Adapter

_DTYPE_TEXT = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # as inspect has shown them
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def layer_and_module(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.down_proj.weight`` -> ``(3, "mlp.down_proj.weight")``."""
    match = _LAYER.search(name)
    if not match:
        return None, name
    return int(match.group(1)), name[match.end() :]


def ranges(values: list[int]) -> str:
    """Compact text for a sorted index list: ``[0, 1, 2, 7, 9, 10]`` -> ``"0-2,7,9-10"``."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def with_units(rows: list[dict[str, Any]], info: Any) -> list[dict[str, Any]]:
    """``rows`` with the heads and channels each S2FT target holds, read through a family description.

    ``info`` is an ``s2reg.arch.ModelInfo`` of the base: a fused, interleaved or transposed tensor's
    indices become units per role (``{"q": [1], "k": [0]}``), and a layer and expert come from the
    description instead of the name. Targets that hold no unit keep ``units`` None. A target on a stacked
    tensor (FORMAT §4.5) gives one row per expert it touches.
    """
    out = []
    for row in rows:
        c = info.coupled(row["name"]) if row.get("axis") else None  # only a slice of rows or columns holds units
        if c is None or c.axis != row["axis"]:
            out.append({**row, "units": None, "unit_totals": None, "expert": None})
            continue
        for expert, units in info.expert_units(row["name"], row["indices"]).items():
            totals = {role: info.unit_count(row["name"], role) for role in units}
            out.append({**row, "layer": c.layer, "expert": expert, "units": units, "unit_totals": totals})
    return out


def target_rows(adapter: Adapter, *, sizes: bool = False) -> list[dict[str, Any]]:
    """One row per target (``Adapter.stats``); ``sizes`` adds ``compressed_bytes``, each target compressed
    alone, which costs a zstd run per target: most of an ``inspect`` when it is always done."""
    from ..kinds import kind_of  # the kinds import this module's helpers: named here, once it is loaded

    rows = []
    for name, t in adapter.targets.items():
        layer, module = layer_and_module(name)
        dense_size = math.prod(t.shape)
        tensors = t.payload_tensors(name)
        row: dict[str, Any] = {
            "name": name,
            "layer": layer,
            "module": module,
            "kind": t.kind,
            "shape": list(t.shape),
            "dtype": _DTYPE_TEXT[dtypes.name_of(t.dtype)],
            "params": t.num_params,
            "percent_of_base": 100.0 * t.num_params / dense_size,
            "payload_bytes": sum(x.nbytes for x in tensors.values()),
        }
        if sizes:  # the payload file of an adapter holding this target alone
            row["compressed_bytes"] = len(codec.encode(type(adapter)({name: t}, adapter.base).payload_bytes()))
        row.update(kind_of(t).stats_columns(t))
        rows.append(row)
    return rows
