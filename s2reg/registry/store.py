"""The local adapter store: content-addressed blobs and ``name:tag`` refs, like an OCI registry.

Layout under the root (``$S2REG_HOME``, default ``~/.cache/s2reg``), spec/REGISTRY.md §1:
``blobs/sha256/<ab>/<digest>`` holds every manifest and payload once, however many refs point at
it; ``refs/<name>/<tag>`` holds the manifest digest of one stored adapter. Under an exclusive lock,
blobs are written first (temp file, fsync, rename) and the ref last, so a crashed push leaves no
half ref; every change of refs, blobs or views takes the lock, so concurrent pushes, tags, loads
and ``gc`` from several processes are safe. Every read re-hashes what it reads, and store files are
opened without following links, only as regular files, and read no further than their recorded size.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError, NotFound, RegistryError
from ..format.manifest import read_manifest
from ..format.digest import sha256_bytes, sha256_stream
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..fsatomic import building, is_temp_name, write_file
from ..fsread import open_regular, read_regular
from .names import Ref, parse_ref

if TYPE_CHECKING:
    from ..format.adapter import Adapter

_HEX = frozenset("0123456789abcdef")
_MAX_REF_BYTES = 128  # "sha256:" + 64 hex digits + newline, with room to spare


def _load(path: Path, **options: Any) -> Adapter:
    """``s2reg.load``, imported on first use: listing, tagging and verifying never need numpy."""
    from ..format.adapter import load

    return load(path, **options)


class _NotRegular(IntegrityError):
    """A store file is a link, a directory, a FIFO or a device instead of a regular file."""


def _open_regular(path: Path) -> int:
    """A descriptor of ``path``, which must be a regular file reached without following a link."""
    return open_regular(path, follow_links=False, error=_NotRegular)


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`_open_regular`); IntegrityError past ``limit`` bytes."""
    return read_regular(path, limit, follow_links=False, error=_NotRegular)


def _hash_regular(path: Path) -> str:
    """sha256 of the regular file ``path``, streamed (bounded memory whatever its size)."""
    with os.fdopen(_open_regular(path), "rb") as fh:
        return sha256_stream(fh.read, what=str(path))


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_any(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied) where the filesystem allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def default_root() -> Path:
    return Path(os.environ.get("S2REG_HOME") or Path.home() / ".cache" / "s2reg")


def _adapter_files(digest: str, manifest: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """An adapter directory's files: name -> (blob digest, recorded size; None for the manifest)."""
    payload = manifest["payload"]
    return {MANIFEST_NAME: (digest, None), payload["file"]: (payload["sha256"], int(payload["bytes"]))}


@dataclass(frozen=True)
class Entry:
    """One ref and what it points at."""

    ref: Ref
    digest: str
    manifest: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "ref": str(self.ref),
            "digest": self.digest,
            "kind": m["kind"],
            "base": m["base"]["name"],
            "targets": len(m["targets"]),
            "bytes": m["payload"]["bytes"],
            "created": m["provenance"].get("created"),
        }

    def files(self) -> dict[str, tuple[str, int | None]]:
        return _adapter_files(self.digest, self.manifest)


class Store:
    """A local adapter store rooted at ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    # -- paths ----------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise IntegrityError(f"malformed blob digest {digest!r}")
        return self.root / "blobs" / "sha256" / digest[:2] / digest

    def _ref_path(self, ref: Ref) -> Path:
        path = self.root.joinpath("refs", *ref.parts)
        if not path.resolve().is_relative_to((self.root / "refs").resolve()):
            raise RegistryError(f"adapter name {ref.name!r} would leave the store")
        return path

    @contextmanager
    def _locked(self, *, shared: bool = False) -> Iterator[None]:
        """The store lock: exclusive for every change, shared for reads that must not see one midway.

        A shared lock on a store that does not exist yet locks nothing (there is nothing to read).
        """
        lock = self.root / "lock"
        if not shared:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            fh = open(lock, "ab")
        except OSError:
            if not shared:
                raise
            try:
                fh = open(lock, "rb")  # a store this user may only read
            except OSError:
                yield  # no store yet: nothing to read, nothing to lock
                return
        with fh:
            fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield

    # -- blobs ----------------------------------------------------------------------------------
    def _quarantine(self, path: Path) -> None:
        """Move a damaged store file (of whatever type) aside into ``quarantine/``."""
        quarantine = self.root / "quarantine"
        quarantine.mkdir(parents=True, exist_ok=True)
        os.replace(path, quarantine / f"{path.name}.{time.time_ns()}")

    def _put_blob(self, data: bytes) -> str:
        """Store ``data`` under its digest (caller holds the lock); a damaged copy there is quarantined first."""
        digest = sha256_bytes(data)
        path = self.blob_path(digest)
        if os.path.lexists(path):
            try:
                if sha256_bytes(_read_regular(path, len(data))) == digest:
                    return digest  # stored once, however many refs point at it
            except (IntegrityError, OSError):
                pass
            self._quarantine(path)  # views that linked it are found stale and rebuilt (resolve)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data, mode=0o444)
        return digest

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        """A blob's bytes, re-hashed: IntegrityError if they do not match their name.

        ``size`` is the size recorded for it (a payload's ``payload.bytes``); a manifest is read
        up to the format's manifest limit. Nothing is read past that, and only from a regular file.
        """
        path = self.blob_path(digest)
        try:
            data = _read_regular(path, MAX_MANIFEST_BYTES if size is None else size)
        except FileNotFoundError:
            raise IntegrityError(f"blob {digest[:16]} is missing from the store (run `s2reg verify`)") from None
        except IntegrityError as exc:
            raise IntegrityError(f"blob {digest[:16]}: {exc}; run `s2reg verify` to quarantine it") from None
        except OSError as exc:
            raise IntegrityError(f"blob {digest[:16]} is unreadable ({exc.strerror}); run `s2reg verify`") from None
        if sha256_bytes(data) != digest or (size is not None and len(data) != size):
            raise IntegrityError(f"blob {digest[:16]} is corrupted (sha256 mismatch); run `s2reg verify` to quarantine it")
        return data

    # -- refs -----------------------------------------------------------------------------------
    def digest_of(self, ref: str | Ref) -> str:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        path = self._ref_path(ref)
        try:
            text = _read_regular(path, _MAX_REF_BYTES).decode("ascii", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no adapter {ref} in {self.root} (see `s2reg ls`)") from None
        except (IntegrityError, OSError) as exc:
            raise IntegrityError(f"ref {ref} is corrupted ({exc})") from None
        digest = text.removeprefix("sha256:")
        if not text.startswith("sha256:"):
            raise IntegrityError(f"ref {ref} is corrupted")
        self.blob_path(digest)
        return digest

    def _set_ref(self, ref: Ref, digest: str) -> None:
        path = self._ref_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, f"sha256:{digest}\n".encode())

    def refs(self) -> list[Ref]:
        base = self.root / "refs"
        if not base.is_dir():
            return []
        found = []
        for path in sorted(p for p in base.rglob("*") if not p.is_dir() and not p.name.startswith(".")):
            parts = path.relative_to(base).parts
            found.append(Ref("/".join(parts[:-1]), parts[-1]))
        return found

    # -- adapters -------------------------------------------------------------------------------
    def push(self, source: str | os.PathLike | Adapter, ref: str | Ref) -> str:
        """Store an adapter (a directory, checked per FORMAT §7, or an in-memory one) as ``ref``.

        Returns the manifest digest. The payload blob is stored before the manifest blob and both
        before the ref, so a reader never sees a ref whose blobs are missing.
        """
        from ..format.adapter import Adapter

        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if isinstance(source, Adapter):
            with tempfile.TemporaryDirectory() as tmp:
                source.save(Path(tmp) / "adapter")
                return self.push(Path(tmp) / "adapter", ref)
        path = Path(source)
        _load(path)  # every check of FORMAT §7 before anything enters the store
        manifest, text = read_manifest(path)
        payload = (path / manifest["payload"]["file"]).read_bytes()
        with self._locked():  # so that a concurrent gc never takes blobs whose ref is not written yet
            if self._put_blob(payload) != manifest["payload"]["sha256"]:
                raise IntegrityError(f"{path}: payload changed while it was being pushed")
            digest = self._put_blob(text)
            self._set_ref(ref, digest)
        return digest

    def entry(self, ref: str | Ref) -> Entry:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        digest = self.digest_of(ref)
        return Entry(ref, digest, json.loads(self.read_blob(digest)))

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

    def _view_is_current(self, view: Path, files: dict[str, tuple[str, int | None]]) -> bool:
        """Whether ``view`` holds exactly the adapter's blobs (``files``, see :meth:`Entry.files`): the
        same regular files (hard links), or regular copies with the right bytes (no hard links there)."""
        for name, (digest, size) in files.items():
            try:
                mine, blob = os.lstat(view / name), os.lstat(self.blob_path(digest))
            except OSError:
                return False
            if _same_file(mine, blob):
                continue
            if not stat.S_ISREG(mine.st_mode) or (size is not None and mine.st_size != size):
                return False
            try:
                if _hash_regular(view / name) != digest:
                    return False
            except (IntegrityError, OSError):
                return False
        return True

    def _view(self, ref: str | Ref, *, build: bool) -> Path | None:
        """The adapter directory of ``ref`` in ``views/`` if it is current; else, with ``build``, made
        afresh from verified blobs. The caller holds the lock (exclusive to build)."""
        entry = self.entry(ref)
        view = self.root / "views" / entry.digest
        if self._view_is_current(view, entry.files()):
            return view
        if not build:
            return None
        for digest, size in entry.files().values():
            self.read_blob(digest, size)
        with building(view, overwrite=True) as staging:
            for name, (digest, _) in entry.files().items():
                _link_or_copy(self.blob_path(digest), staging / name)
        return view

    def resolve(self, ref: str | Ref) -> Path:
        """A verified, read-only adapter directory for ``ref`` inside the store.

        A view that is missing or stale (not the blobs the ref names, e.g. after a blob was
        quarantined and pushed again) is rebuilt under the lock, so ``gc`` never removes one being
        built and concurrent readers never see one half-built. (:meth:`load` also reads it under
        the lock; a path from here stays valid while its ref does.)
        """
        with self._locked(shared=True):
            view = self._view(ref, build=False)
        if view is None:
            with self._locked():
                view = self._view(ref, build=True)
        return view

    def load(self, ref: str | Ref, **options: Any) -> Adapter:
        """The adapter ``ref``, with the manifest digest and the payload (FORMAT §7) verified.

        Read under the store lock, so a concurrent ``gc`` (or a re-tag and ``gc``) cannot remove
        the files midway. ``options`` go to :func:`s2reg.load`.
        """
        with self._locked(shared=True):
            view = self._view(ref, build=False)
            if view is not None:
                return _load(view, **options)
        with self._locked():
            return _load(self._view(ref, build=True), **options)

    def tag(self, source: str | Ref, target: str | Ref) -> str:
        """Point ``target`` at what ``source`` points at. Resolved and written under the lock, so a
        concurrent ``rm`` + ``gc`` of ``source`` cannot leave ``target`` pointing at removed blobs."""
        target = parse_ref(target) if isinstance(target, str) else target
        with self._locked():
            digest = self.digest_of(source)
            self.read_blob(digest)  # present and intact
            self._set_ref(target, digest)
        return digest

    def remove(self, ref: str | Ref) -> str:
        """Delete a ref (its blobs stay until :meth:`gc`)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self._locked():
            digest = self.digest_of(ref)
            path = self._ref_path(ref)
            path.unlink()
            for parent in path.parents:
                if parent == self.root / "refs" or any(parent.iterdir()):
                    break
                parent.rmdir()
        return digest

    def entries(self, *, kind: str | None = None) -> list[Entry]:
        found = []
        for ref in self.refs():
            entry = self.entry(ref)
            if kind is None or entry.manifest["kind"] == kind:
                found.append(entry)
        return found

    def _referenced(self) -> set[str]:
        keep = set()
        for ref in self.refs():
            try:
                digest = self.digest_of(ref)
                keep |= {digest, json.loads(self.read_blob(digest))["payload"]["sha256"]}
            except (IntegrityError, ValueError, KeyError):
                continue
        return keep

    def _views(self) -> list[Path]:
        base = self.root / "views"
        return sorted(base.iterdir()) if base.is_dir() else []

    def gc(self) -> dict[str, int]:
        """Delete blobs no ref points at (and stale views and temp files); return counts and bytes."""
        with self._locked():
            keep = self._referenced()
            removed = freed = 0
            for path in self._blob_files():
                if path.name not in keep:
                    freed += path.lstat().st_size
                    _remove_any(path)
                    removed += 1
            for view in self._views():
                if view.name not in keep:  # also views a crash left half-built (their names are temp names)
                    _remove_any(view)
            refs = self.root / "refs"
            for temp in [p for p in refs.rglob(".*") if is_temp_name(p.name)] if refs.is_dir() else ():
                temp.unlink(missing_ok=True)
        return {"blobs_removed": removed, "bytes_freed": freed, "blobs_kept": len(keep)}

    def _blob_files(self) -> list[Path]:
        """Everything under ``blobs/sha256/<ab>/``, whatever its type (verify and gc judge it)."""
        base = self.root / "blobs" / "sha256"
        return sorted(base.glob("*/*")) if base.is_dir() else []

    def _check_blob(self, path: Path) -> bool:
        try:
            return _hash_regular(path) == path.name
        except (IntegrityError, OSError):
            return False

    def _check_view(self, view: Path) -> bool:
        try:
            return self._view_is_current(view, _adapter_files(view.name, json.loads(self.read_blob(view.name))))
        except (IntegrityError, ValueError, KeyError, TypeError):
            return False

    def verify(self) -> dict[str, Any]:
        """Re-hash every blob; move corrupt ones (and anything that is not a regular file) to
        ``quarantine/``; remove views that are not exactly their blobs (the next load rebuilds them);
        report the refs the corrupt blobs break."""
        with self._locked():
            corrupt, checked = [], 0
            for path in self._blob_files():
                if path.name.startswith("."):  # a temp file a crashed write left behind
                    _remove_any(path)
                    continue
                checked += 1
                if not self._check_blob(path):
                    self._quarantine(path)
                    corrupt.append(path.name)
            stale = []
            for view in self._views():
                if not self._check_view(view):
                    _remove_any(view)
                    stale.append(view.name)
            broken = []
            for ref in self.refs():
                try:
                    entry = self.entry(ref)
                    payload = entry.manifest["payload"]
                    self.read_blob(payload["sha256"], int(payload["bytes"]))
                except (IntegrityError, ValueError, KeyError, TypeError) as exc:
                    broken.append({"ref": str(ref), "error": str(exc)})
        return {"blobs_checked": checked, "corrupt": corrupt, "broken_refs": broken,
                "views_checked": len(stale) + len(self._views()), "stale_views_removed": stale}
