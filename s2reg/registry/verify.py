"""``verify``: re-hash every blob, quarantine the damaged ones, drop views that are not current, name broken refs.

spec/REGISTRY.md §4. Run under the exclusive store lock (:meth:`Store.verify`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError
from .files import remove_any

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class BrokenRef:
    """A ref whose manifest or payload blob is damaged or missing, and why."""

    ref: str
    error: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyResult:
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

    def as_json(self) -> dict[str, Any]:
        return {"blobs_checked": self.blobs_checked, "corrupt": list(self.corrupt),
                "broken_refs": [broken.as_json() for broken in self.broken_refs], "views_checked": self.views_checked,
                "stale_views_removed": list(self.stale_views_removed)}


def verify_store(store: Store) -> VerifyResult:
    """Check ``store`` whole and repair what can be (caller holds its exclusive lock)."""
    corrupt, checked = [], 0
    for path in store.blobs.files():
        if path.name.startswith("."):  # a temp file a crashed write left behind
            remove_any(path)
            continue
        checked += 1
        if not store.blobs.is_intact(path):
            store.blobs.quarantine(path)
            corrupt.append(path.name)
    views, stale = store.views.all(), []
    for view in views:
        if not store.views.is_sound(view):
            remove_any(view)
            stale.append(view.name)
    broken = []
    for ref in store.refs():
        try:
            payload = store.entry(ref).manifest["payload"]
            store.read_blob(payload["sha256"], int(payload["bytes"]))
        except (IntegrityError, ValueError, KeyError, TypeError) as exc:
            broken.append(BrokenRef(str(ref), str(exc)))
    return VerifyResult(blobs_checked=checked, corrupt=tuple(corrupt), broken_refs=tuple(broken),
                        views_checked=len(views), stale_views_removed=tuple(stale))
