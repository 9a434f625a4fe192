"""Refs: ``refs/<name components...>/<tag>``, each the text ``sha256:<manifest digest>\\n`` (spec/REGISTRY.md §1-§3).

A ref is written last and atomically, under the store lock, so a reader never finds one whose blobs
are missing; names (:mod:`.names`) and a resolved-path check keep every ref inside ``refs/``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import IntegrityError, NotFound, RegistryError
from ..fsatomic import is_temp_name, write_file
from .blobs import check_digest
from .files import read_store_file
from .names import Ref

_MAX_REF_BYTES = 128  # "sha256:" + 64 hex digits + newline, with room to spare


class Refs:
    """The refs of the store at ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.base = root / "refs"

    def path(self, ref: Ref) -> Path:
        path = self.base.joinpath(*ref.parts)
        if not path.resolve().is_relative_to(self.base.resolve()):
            raise RegistryError(f"adapter name {ref.name!r} would leave the store")
        return path

    def digest_of(self, ref: Ref) -> str:
        """The manifest digest ``ref`` names: NotFound without it, IntegrityError when it is damaged."""
        try:
            text = read_store_file(self.path(ref), _MAX_REF_BYTES).decode("ascii", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no adapter {ref} in {self.root} (see `s2reg ls`)") from None
        except (IntegrityError, OSError) as exc:
            raise IntegrityError(f"ref {ref} is corrupted ({exc})") from None
        if not text.startswith("sha256:"):
            raise IntegrityError(f"ref {ref} is corrupted")
        return check_digest(text.removeprefix("sha256:"))

    def write(self, ref: Ref, digest: str) -> None:
        """Point ``ref`` at ``digest``, atomically (caller holds the lock)."""
        path = self.path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, f"sha256:{digest}\n".encode())

    def remove(self, ref: Ref) -> None:
        """Delete ``ref``'s file and the name directories it leaves empty (caller holds the lock)."""
        path = self.path(ref)
        path.unlink()
        for parent in path.parents:
            if parent == self.base or any(parent.iterdir()):
                break
            parent.rmdir()

    def all(self) -> list[Ref]:
        """Every ref, sorted by path (temp files of interrupted writes left out)."""
        if not self.base.is_dir():
            return []
        found = []
        for path in sorted(p for p in self.base.rglob("*") if not p.is_dir() and not p.name.startswith(".")):
            parts = path.relative_to(self.base).parts
            found.append(Ref("/".join(parts[:-1]), parts[-1]))
        return found

    def temp_files(self) -> list[Path]:
        """What interrupted ref writes left behind."""
        return [p for p in self.base.rglob(".*") if is_temp_name(p.name)] if self.base.is_dir() else []
