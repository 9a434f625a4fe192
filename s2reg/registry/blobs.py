"""Content-addressed blobs: ``blobs/sha256/<ab>/<digest>``, each stored once and re-hashed on every read.

spec/REGISTRY.md §1, §3.2, §4. Writers hold the store lock (:mod:`.locks`); a damaged blob is moved
aside into ``quarantine/``, whatever its type, never overwritten in place (a view may link it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import IntegrityError
from ..format.digest import sha256_bytes
from ..format.manifest import MAX_MANIFEST_BYTES
from ..fsatomic import write_file
from .files import hash_store_file, read_store_file

_HEX = frozenset("0123456789abcdef")


def check_digest(digest: str) -> str:
    """``digest`` if it is 64 lowercase hex digits (it names a file: nothing else may), else IntegrityError."""
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise IntegrityError(f"malformed blob digest {digest!r}")
    return digest


class Blobs:
    """The blobs of the store at ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.base = root / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        return self.base / check_digest(digest)[:2] / digest

    def files(self) -> list[Path]:
        """Everything under ``blobs/sha256/<ab>/``, whatever its type (verify and gc judge it)."""
        return sorted(self.base.glob("*/*")) if self.base.is_dir() else []

    def quarantine(self, path: Path) -> None:
        """Move a damaged store file (of whatever type) aside into ``quarantine/``."""
        quarantine = self.root / "quarantine"
        quarantine.mkdir(parents=True, exist_ok=True)
        os.replace(path, quarantine / f"{path.name}.{time.time_ns()}")

    def is_intact(self, path: Path) -> bool:
        """Whether the blob file ``path`` is a regular file whose bytes hash to its name."""
        try:
            return hash_store_file(path) == path.name
        except (IntegrityError, OSError):
            return False

    def put(self, data: bytes) -> str:
        """Store ``data`` under its digest (caller holds the lock); a damaged copy there is quarantined first."""
        digest = sha256_bytes(data)
        path = self.path(digest)
        if os.path.lexists(path):
            try:
                if sha256_bytes(read_store_file(path, len(data))) == digest:
                    return digest  # stored once, however many refs point at it
            except (IntegrityError, OSError):
                pass
            self.quarantine(path)  # views that linked it are found stale and rebuilt (resolve)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data, mode=0o444)
        return digest

    def read(self, digest: str, size: int | None = None) -> bytes:
        """A blob's bytes, re-hashed: IntegrityError if they do not match their name.

        ``size`` is the size recorded for it (a payload's ``payload.bytes``); a manifest is read
        up to the format's manifest limit. Nothing is read past that, and only from a regular file.
        """
        path = self.path(digest)
        try:
            data = read_store_file(path, MAX_MANIFEST_BYTES if size is None else size)
        except FileNotFoundError:
            raise IntegrityError(f"blob {digest[:16]} is missing from the store (run `s2reg verify`)") from None
        except IntegrityError as exc:
            raise IntegrityError(f"blob {digest[:16]}: {exc}; run `s2reg verify` to quarantine it") from None
        except OSError as exc:
            raise IntegrityError(f"blob {digest[:16]} is unreadable ({exc.strerror}); run `s2reg verify`") from None
        if sha256_bytes(data) != digest or (size is not None and len(data) != size):
            raise IntegrityError(f"blob {digest[:16]} is corrupted (sha256 mismatch); run `s2reg verify` to quarantine it")
        return data
