"""``describe``: an adapter as plain data, the single source of ``s2reg inspect`` (table and JSON)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..format import Adapter
from ..format.stats import with_units
from ..results import Result, omitted_if_none


@dataclass(frozen=True)
class BaseRef(Result):
    """The base model an adapter was made for, as its manifest names it."""

    name: str
    revision: str | None


@dataclass(frozen=True)
class AdapterSummary(Result):
    """An adapter's kind, base, size and metadata; a loaded one also its payload on disk (else those are None),
    one shown from a registry also its ``ref``."""

    kind: str
    base: BaseRef
    targets: int
    params: int
    percent_of_targeted: float
    params_meta: Mapping[str, Any]
    provenance: Mapping[str, Any]
    path: str | None = omitted_if_none()
    digest: str | None = omitted_if_none()
    encoding: str | None = omitted_if_none()
    bytes_on_disk: int | None = omitted_if_none()
    raw_bytes: int | None = omitted_if_none()
    compression_ratio: float | None = omitted_if_none()
    ref: str | None = omitted_if_none()


@dataclass(frozen=True)
class Description(Result):
    """The summary, and one row per target: ``Adapter.stats`` rows (kind-specific keys), with heads and
    channels named when the base was given."""

    summary: AdapterSummary
    targets: tuple[dict[str, Any], ...]

    def with_ref(self, ref: str) -> Description:
        """This description of an adapter shown from a registry by ``ref``."""
        return dataclasses.replace(self, summary=dataclasses.replace(self.summary, ref=ref))


def describe(adapter: Adapter, info: Any = None, *, sizes: bool = False) -> Description:
    """Summary and per-target statistics of an adapter (a loaded one also reports its disk bytes).

    With ``info`` (the base's ``s2reg.arch.ModelInfo``), S2FT rows also say which heads and channels they hold;
    with ``sizes``, each target's compressed size (``Adapter.stats``).
    """
    rows = adapter.stats(sizes=sizes)
    rows = rows if info is None else with_units(rows, info)
    base_numel = sum(r["params"] / (r["percent_of_base"] / 100) for r in rows if r["percent_of_base"])
    stored = adapter.stored
    on_disk: dict[str, Any] = {}
    if stored is not None:
        on_disk = dict(
            path=str(stored.path),
            digest=stored.digest,
            encoding=stored.encoding,
            bytes_on_disk=stored.payload_bytes,
            raw_bytes=stored.raw_bytes,
            compression_ratio=stored.raw_bytes / stored.payload_bytes if stored.payload_bytes else 1.0,
        )
    summary = AdapterSummary(
        kind=adapter.kind,
        base=BaseRef(adapter.base.name, adapter.base.revision),
        targets=len(rows),
        params=adapter.num_params,
        percent_of_targeted=100.0 * adapter.num_params / base_numel if base_numel else 0.0,
        params_meta=adapter.params,
        provenance=adapter.provenance,
        **on_disk,
    )
    return Description(summary, tuple(rows))
