"""``gc``: delete the blobs no ref points at, the views no ref needs and the temp files of crashed writes.

spec/REGISTRY.md §1, §3. Run under the exclusive store lock (``Store.gc``), so the blobs of a push
in progress, whose ref is not written yet, are never taken: the push holds the lock until it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IntegrityError
from ..results import Result
from .blobs import Blobs
from .entry import read_entry
from .files import remove_any
from .refs import Refs
from .views import Views


@dataclass(frozen=True)
class GcResult(Result):
    """What ``gc`` removed and kept (``blobs_kept``: the blobs some ref needs)."""

    blobs_removed: int
    bytes_freed: int
    blobs_kept: int


def referenced_blobs(blobs: Blobs, refs: Refs) -> set[str]:
    """The digests of every blob a ref needs: its manifest and the payload that names (damaged refs skipped)."""
    keep = set()
    for ref in refs.all():
        try:
            entry = read_entry(blobs, refs, ref)
            keep |= {entry.digest, entry.manifest["payload"]["sha256"]}
        except (IntegrityError, ValueError, KeyError, TypeError):
            continue
    return keep


def collect_garbage(blobs: Blobs, refs: Refs, views: Views) -> GcResult:
    """Remove what no ref needs from a store's blobs and views (caller holds its exclusive lock)."""
    keep = referenced_blobs(blobs, refs)
    removed = freed = 0
    for path in blobs.files():
        if path.name not in keep:
            freed += path.lstat().st_size
            remove_any(path)
            removed += 1
    for view in views.all():
        if view.name not in keep:  # also views a crash left half-built (their names are temp names)
            remove_any(view)
    for temp in refs.temp_files():
        temp.unlink(missing_ok=True)
    return GcResult(blobs_removed=removed, bytes_freed=freed, blobs_kept=len(keep))
