"""``describe``: an adapter as plain data, the single source of ``s2reg inspect`` (table and JSON)."""

from __future__ import annotations

from typing import Any

from ..format import Adapter
from ..format.stats import with_units


def describe(adapter: Adapter, info: Any = None, *, sizes: bool = False) -> dict[str, Any]:
    """Summary and per-target statistics of an adapter (a loaded one also reports its disk bytes).

    With ``info`` (the base's ``s2reg.arch.ModelInfo``), S2FT rows also say which heads and channels they hold;
    with ``sizes``, each target's compressed size (``Adapter.stats``).
    """
    rows = adapter.stats(sizes=sizes)
    rows = rows if info is None else with_units(rows, info)
    base_numel = sum(r["params"] / (r["percent_of_base"] / 100) for r in rows if r["percent_of_base"])
    stored = adapter.stored
    summary: dict[str, Any] = {
        "kind": adapter.kind,
        "base": {"name": adapter.base.name, "revision": adapter.base.revision},
        "targets": len(rows),
        "params": adapter.num_params,
        "percent_of_targeted": 100.0 * adapter.num_params / base_numel if base_numel else 0.0,
        "params_meta": adapter.params,
        "provenance": adapter.provenance,
    }
    if stored is not None:
        summary.update(
            path=str(stored.path),
            digest=stored.digest,
            encoding=stored.encoding,
            bytes_on_disk=stored.payload_bytes,
            raw_bytes=stored.raw_bytes,
            compression_ratio=stored.raw_bytes / stored.payload_bytes if stored.payload_bytes else 1.0,
        )
    return {"summary": summary, "targets": rows}
