"""The local adapter store: content-addressed blobs and ``name:tag`` refs, like an OCI registry.

Layout under the root (``$S2REG_HOME``, default ``~/.cache/s2reg``), spec/REGISTRY.md §1:
``blobs/sha256/<ab>/<digest>`` holds every manifest and payload once, however many refs point at
it; ``refs/<name>/<tag>`` holds the manifest digest of one stored adapter. Under an exclusive lock,
blobs are written first (temp file, fsync, rename) and the ref last, so a crashed push leaves no
half ref, and concurrent pushes and ``gc`` from several processes are safe. Every read re-hashes what it
reads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, NotFound, RegistryError
from ..format import Adapter, load, read_manifest
from ..format.digest import sha256_bytes
from ..format.manifest import MANIFEST_NAME
from ..fsatomic import building, write_file
from .names import Ref, parse_ref

_HEX = frozenset("0123456789abcdef")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied) where the filesystem allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def default_root() -> Path:
    return Path(os.environ.get("S2REG_HOME") or Path.home() / ".cache" / "s2reg")


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
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    # -- blobs ----------------------------------------------------------------------------------
    def _put_blob(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        path = self.blob_path(digest)
        if path.is_file():
            if path.stat().st_size == len(data) and sha256_bytes(path.read_bytes()) == digest:
                return digest  # stored once, however many refs point at it
            shutil.rmtree(self.root / "views", ignore_errors=True)  # views may link the damaged copy
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data, mode=0o444)
        return digest

    def read_blob(self, digest: str) -> bytes:
        """A blob's bytes, re-hashed: IntegrityError if they do not match their name."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"blob {digest[:16]} is missing from the store (run `s2reg verify`)") from None
        if sha256_bytes(data) != digest:
            raise IntegrityError(f"blob {digest[:16]} is corrupted (sha256 mismatch); run `s2reg verify` to quarantine it")
        return data

    # -- refs -----------------------------------------------------------------------------------
    def digest_of(self, ref: str | Ref) -> str:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        path = self._ref_path(ref)
        if not path.is_file():
            raise NotFound(f"no adapter {ref} in {self.root} (see `s2reg ls`)")
        text = path.read_text().strip()
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
        for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")):
            parts = path.relative_to(base).parts
            found.append(Ref("/".join(parts[:-1]), parts[-1]))
        return found

    # -- adapters -------------------------------------------------------------------------------
    def push(self, source: str | os.PathLike | Adapter, ref: str | Ref) -> str:
        """Store an adapter (a directory, checked per FORMAT §7, or an in-memory one) as ``ref``.

        Returns the manifest digest. The payload blob is stored before the manifest blob and both
        before the ref, so a reader never sees a ref whose blobs are missing.
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if isinstance(source, Adapter):
            with tempfile.TemporaryDirectory() as tmp:
                source.save(Path(tmp) / "adapter")
                return self.push(Path(tmp) / "adapter", ref)
        path = Path(source)
        load(path)  # every check of FORMAT §7 before anything enters the store
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
        entry = self.entry(ref)
        payload_entry = entry.manifest["payload"]
        payload = self.read_blob(payload_entry["sha256"])
        with building(Path(output), overwrite=overwrite) as staging:
            (staging / MANIFEST_NAME).write_bytes(self.read_blob(entry.digest))
            (staging / payload_entry["file"]).write_bytes(payload)
            load(staging)  # and the format's own checks, before the directory appears
        return Path(output)

    def resolve(self, ref: str | Ref) -> Path:
        """A verified, read-only adapter directory for ``ref`` inside the store (for ``s2reg.load``)."""
        entry = self.entry(ref)
        view = self.root / "views" / entry.digest
        if not (view / MANIFEST_NAME).is_file():
            payload_entry = entry.manifest["payload"]
            self.read_blob(payload_entry["sha256"])
            with building(view, overwrite=True) as staging:
                _link_or_copy(self.blob_path(entry.digest), staging / MANIFEST_NAME)
                _link_or_copy(self.blob_path(payload_entry["sha256"]), staging / payload_entry["file"])
        elif sha256_bytes((view / MANIFEST_NAME).read_bytes()) != entry.digest:
            raise IntegrityError(f"{view}: manifest corrupted; run `s2reg verify`")
        return view

    def load(self, ref: str | Ref) -> Adapter:
        """The adapter ``ref``, with the manifest digest and the payload (FORMAT §7) verified."""
        return load(self.resolve(ref))

    def tag(self, source: str | Ref, target: str | Ref) -> str:
        digest = self.digest_of(source)
        with self._locked():
            self._set_ref(parse_ref(target) if isinstance(target, str) else target, digest)
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

    def gc(self) -> dict[str, int]:
        """Delete blobs no ref points at (and stale views and temp files); return counts and bytes."""
        with self._locked():
            keep = self._referenced()
            removed = freed = 0
            for path in self._blob_files():
                if path.name not in keep:
                    freed += path.stat().st_size
                    path.unlink()
                    removed += 1
            for view in (self.root / "views").glob("*") if (self.root / "views").is_dir() else ():
                if view.name not in keep:
                    shutil.rmtree(view, ignore_errors=True)
        return {"blobs_removed": removed, "bytes_freed": freed, "blobs_kept": len(keep)}

    def _blob_files(self) -> list[Path]:
        base = self.root / "blobs" / "sha256"
        return sorted(p for p in base.glob("*/*") if p.is_file()) if base.is_dir() else []

    def verify(self) -> dict[str, Any]:
        """Re-hash every blob; move corrupt ones to ``quarantine/``; report the refs they break."""
        with self._locked():
            corrupt = []
            for path in self._blob_files():
                if path.name.startswith("."):  # a temp file a crashed write left behind
                    path.unlink()
                    continue
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
                if h.hexdigest() != path.name:
                    quarantine = self.root / "quarantine"
                    quarantine.mkdir(parents=True, exist_ok=True)
                    os.replace(path, quarantine / f"{path.name}.{int(time.time())}")
                    shutil.rmtree(self.root / "views" / path.name, ignore_errors=True)
                    corrupt.append(path.name)
            broken = []
            for ref in self.refs():
                try:
                    entry = self.entry(ref)
                    self.read_blob(entry.manifest["payload"]["sha256"])
                except (IntegrityError, ValueError, KeyError) as exc:
                    broken.append({"ref": str(ref), "error": str(exc)})
        return {"blobs_checked": len(self._blob_files()) + len(corrupt), "corrupt": corrupt, "broken_refs": broken}
