"""``gc``: delete the blobs no ref points at, the views no ref needs and the temp files of crashed writes.

spec/REGISTRY.md §1, §3. Run under the exclusive store lock (:meth:`Store.gc`), so the blobs of a push
in progress, whose ref is not written yet, are never taken: the push holds the lock until it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError
from .files import remove_any

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class GcResult:
    """What ``gc`` removed and kept (``blobs_kept``: the blobs some ref needs)."""

    blobs_removed: int
    bytes_freed: int
    blobs_kept: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def referenced_blobs(store: Store) -> set[str]:
    """The digests of every blob a ref needs: its manifest and the payload that names (damaged refs skipped)."""
    keep = set()
    for ref in store.refs():
        try:
            digest = store.digest_of(ref)
            keep |= {digest, json.loads(store.read_blob(digest))["payload"]["sha256"]}
        except (IntegrityError, ValueError, KeyError):
            continue
    return keep


def collect_garbage(store: Store) -> GcResult:
    """Remove what no ref needs from ``store`` (caller holds its exclusive lock)."""
    keep = referenced_blobs(store)
    removed = freed = 0
    for path in store.blobs.files():
        if path.name not in keep:
            freed += path.lstat().st_size
            remove_any(path)
            removed += 1
    for view in store.views.all():
        if view.name not in keep:  # also views a crash left half-built (their names are temp names)
            remove_any(view)
    for temp in store.ref_files.temp_files():
        temp.unlink(missing_ok=True)
    return GcResult(blobs_removed=removed, bytes_freed=freed, blobs_kept=len(keep))
