"""``verify``: re-hash every blob, quarantine the damaged ones, drop views that are not current, name broken refs.

spec/REGISTRY.md §4. Run under the exclusive store lock (``Store.verify``).
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
class BrokenRef(Result):
    """A ref whose manifest or payload blob is damaged or missing, and why."""

    ref: str
    error: str


@dataclass(frozen=True)
class VerifyResult(Result):
    """What ``verify`` checked, quarantined (``corrupt``: blob digests) and removed (stale views: digests)."""

    blobs_checked: int
    corrupt: tuple[str, ...]
    broken_refs: tuple[BrokenRef, ...]
    views_checked: int
    stale_views_removed: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """No damaged blob and no broken ref (stale views are rebuilt on the next load: no harm done)."""
        return not self.corrupt and not self.broken_refs


def verify_store(blobs: Blobs, refs: Refs, views: Views) -> VerifyResult:
    """Check a store's blobs, views and refs, and repair what can be (caller holds its exclusive lock)."""
    corrupt, checked = [], 0
    for path in blobs.files():
        if path.name.startswith("."):  # a temp file a crashed write left behind
            remove_any(path)
            continue
        checked += 1
        if not blobs.is_intact(path):
            blobs.quarantine(path)
            corrupt.append(path.name)
    found, stale = views.all(), []
    for view in found:
        if not views.is_sound(view):
            remove_any(view)
            stale.append(view.name)
    broken = []
    for ref in refs.all():
        try:
            payload = read_entry(blobs, refs, ref).manifest["payload"]
            blobs.read(payload["sha256"], int(payload["bytes"]))
        except (IntegrityError, ValueError, KeyError, TypeError) as exc:
            broken.append(BrokenRef(str(ref), str(exc)))
    return VerifyResult(blobs_checked=checked, corrupt=tuple(corrupt), broken_refs=tuple(broken),
                        views_checked=len(found), stale_views_removed=tuple(stale))
