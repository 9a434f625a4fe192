"""Which stored adapters fit a given base checkpoint (``s2reg ls --base``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..format import dtypes
from .entry import Entry, EntrySummary
from .store import Store

if TYPE_CHECKING:
    from ..tensors import CheckpointSource


def fits(entry: Entry, source: CheckpointSource, hashes: dict[str, str]) -> bool:
    """Whether every base fingerprint of the adapter matches the checkpoint (hashes cached in ``hashes``)."""
    for name, fp in entry.manifest["base"]["fingerprints"].items():
        if name not in source:
            return False
        if list(source.shape(name)) != fp["shape"] or dtypes.name_of(source.dtype(name)) != fp["dtype"]:
            return False
        if name not in hashes:
            hashes[name] = source.sha256_of(name)
        if hashes[name] != fp["sha256"]:
            return False
    return True


def list_adapters(store: Store, *, base: str | os.PathLike | None = None, kind: str | None = None) -> list[EntrySummary]:
    """Summaries of the stored adapters, only those of ``kind`` and fitting ``base`` when given."""
    entries = store.entries(kind=kind)
    if base is None:
        return [e.summary() for e in entries]
    from ..tensors import CheckpointSource

    hashes: dict[str, str] = {}  # each base tensor is hashed once, however many adapters name it
    with CheckpointSource(base) as source:
        return [e.summary() for e in entries if fits(e, source, hashes)]
