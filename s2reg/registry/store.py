"""The local adapter store: content-addressed blobs and ``name:tag`` refs, like an OCI registry.

Layout under the root (``$S2REG_HOME``, default ``~/.cache/s2reg``), spec/REGISTRY.md §1:
``blobs/sha256/<ab>/<digest>`` holds every manifest and payload once, however many refs point at
it; ``refs/<name>/<tag>`` holds the manifest digest of one stored adapter. Under an exclusive lock,
blobs are written first (temp file, fsync, rename) and the ref last, so a crashed push leaves no
half ref; every change of refs, blobs or views takes the lock, so concurrent pushes, tags, loads
and ``gc`` from several processes are safe. Every read re-hashes what it reads, and store files are
opened without following links, only as regular files, and read no further than their recorded size.

:class:`Store` is the one entry point; each part of the store is a module of its own: :mod:`.blobs`,
:mod:`.refs`, :mod:`.views`, :mod:`.locks`, :mod:`.gc`, :mod:`.verify` (and :mod:`.files` for their IO).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError, RegistryError
from ..format.manifest import read_manifest
from ..fsatomic import building
from ..home import default_root
from .blobs import Blobs
from .entry import Entry, read_entry
from .gc import GcResult, collect_garbage
from .locks import store_lock
from .names import Ref, parse_ref
from .refs import Refs
from .verify import VerifyResult, verify_store
from .views import Views

if TYPE_CHECKING:
    from ..format.adapter import Adapter


def _load(path: Path, **options: Any) -> Adapter:
    """``s2reg.load``, imported on first use: listing, tagging and verifying never need numpy."""
    from ..format.adapter import load

    return load(path, **options)


def _as_ref(ref: str | Ref) -> Ref:
    return parse_ref(ref) if isinstance(ref, str) else ref


class Store:
    """A local adapter store rooted at ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.blobs = Blobs(self.root)
        self.ref_files = Refs(self.root)
        self.views = Views(self.root, self.blobs)

    def _locked(self, *, shared: bool = False) -> AbstractContextManager[None]:
        return store_lock(self.root, shared=shared)

    # -- blobs and refs -------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs.path(digest)

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        """A blob's bytes, re-hashed (see :meth:`.blobs.Blobs.read`)."""
        return self.blobs.read(digest, size)

    def digest_of(self, ref: str | Ref) -> str:
        return self.ref_files.digest_of(_as_ref(ref))

    def refs(self) -> list[Ref]:
        return self.ref_files.all()

    def entry(self, ref: str | Ref) -> Entry:
        return read_entry(self.blobs, self.ref_files, _as_ref(ref))

    def entries(self, *, kind: str | None = None) -> list[Entry]:
        found = []
        for ref in self.refs():
            entry = self.entry(ref)
            if kind is None or entry.manifest["kind"] == kind:
                found.append(entry)
        return found

    # -- adapters -------------------------------------------------------------------------------
    def push(self, source: str | os.PathLike | Adapter, ref: str | Ref) -> str:
        """Store an adapter (a directory, checked per FORMAT §7, or an in-memory one) as ``ref``.

        Returns the manifest digest. The payload blob is stored before the manifest blob and both
        before the ref, so a reader never sees a ref whose blobs are missing.
        """
        from ..format.adapter import Adapter

        ref = _as_ref(ref)
        if isinstance(source, Adapter):
            with tempfile.TemporaryDirectory() as tmp:
                source.save(Path(tmp) / "adapter")
                return self.push(Path(tmp) / "adapter", ref)
        path = Path(source)
        _load(path)  # every check of FORMAT §7 before anything enters the store
        manifest, text = read_manifest(path)
        payload = (path / manifest["payload"]["file"]).read_bytes()
        with self._locked():  # so that a concurrent gc never takes blobs whose ref is not written yet
            if self.blobs.put(payload) != manifest["payload"]["sha256"]:
                raise IntegrityError(f"{path}: payload changed while it was being pushed")
            digest = self.blobs.put(text)
            self.ref_files.write(ref, digest)
        return digest

    def pull(self, ref: str | Ref, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the adapter ``ref`` as a directory at ``output``; every byte is verified first."""
        self.check_output(output)
        with self._locked(shared=True):  # a concurrent gc waits until the blobs are read
            entry = self.entry(ref)
            files = {name: self.read_blob(digest, size) for name, (digest, size) in entry.files().items()}
        with building(Path(output), overwrite=overwrite) as staging:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            _load(staging)  # and the format's own checks, before the directory appears
        return Path(output)

    def check_output(self, output: str | os.PathLike) -> None:
        """Refuse an output directory inside the store or holding it (writing it would replace store files)."""
        out, root = Path(output).resolve(), self.root.resolve()
        if out.is_relative_to(root) or root.is_relative_to(out):
            raise RegistryError(f"{output}: the output would be inside the store {self.root} or hold it; choose another")

    def _current_view(self, ref: str | Ref) -> Path | None:
        return self.views.current(self.entry(ref))

    def _rebuilt_view(self, ref: str | Ref) -> Path:
        entry = self.entry(ref)  # read again under the exclusive lock: the ref may have moved meanwhile
        return self.views.current(entry) or self.views.build(entry)

    def resolve(self, ref: str | Ref) -> Path:
        """A verified, read-only adapter directory for ``ref`` inside the store.

        A view that is missing or stale (not the blobs the ref names, e.g. after a blob was
        quarantined and pushed again) is rebuilt under the lock, so ``gc`` never removes one being
        built and concurrent readers never see one half-built. (:meth:`load` also reads it under
        the lock; a path from here stays valid while its ref does.)
        """
        with self._locked(shared=True):
            view = self._current_view(ref)
        if view is None:
            with self._locked():
                view = self._rebuilt_view(ref)
        return view

    def load(self, ref: str | Ref, **options: Any) -> Adapter:
        """The adapter ``ref``, with the manifest digest and the payload (FORMAT §7) verified.

        Read under the store lock, so a concurrent ``gc`` (or a re-tag and ``gc``) cannot remove
        the files midway. ``options`` go to :func:`s2reg.load`.
        """
        with self._locked(shared=True):
            view = self._current_view(ref)
            if view is not None:
                return _load(view, **options)
        with self._locked():
            return _load(self._rebuilt_view(ref), **options)

    def tag(self, source: str | Ref, target: str | Ref) -> str:
        """Point ``target`` at what ``source`` points at. Resolved and written under the lock, so a
        concurrent ``rm`` + ``gc`` of ``source`` cannot leave ``target`` pointing at removed blobs."""
        target = _as_ref(target)
        with self._locked():
            digest = self.digest_of(source)
            self.read_blob(digest)  # present and intact
            self.ref_files.write(target, digest)
        return digest

    def remove(self, ref: str | Ref) -> str:
        """Delete a ref (its blobs stay until :meth:`gc`)."""
        ref = _as_ref(ref)
        with self._locked():
            digest = self.digest_of(ref)
            self.ref_files.remove(ref)
        return digest

    # -- upkeep ---------------------------------------------------------------------------------
    def gc(self) -> GcResult:
        """Delete blobs no ref points at (and stale views and temp files); what was removed and kept."""
        with self._locked():
            return collect_garbage(self.blobs, self.ref_files, self.views)

    def verify(self) -> VerifyResult:
        """Re-hash every blob; move corrupt ones (and anything that is not a regular file) to
        ``quarantine/``; remove views that are not exactly their blobs (the next load rebuilds them);
        report the refs the corrupt blobs break."""
        with self._locked():
            return verify_store(self.blobs, self.ref_files, self.views)
