"""Views: ``views/<manifest digest>/``, an adapter directory of hard links to its two blobs (spec/REGISTRY.md §1).

A view is handed to readers (``s2reg.load``) only while it is *current*: each file the same regular
file as its blob, or a regular copy with the blob's size and sha256 (where there are no hard links).
One that is not (its blob was quarantined and pushed again, a file was replaced) is rebuilt from
verified blobs, under the exclusive lock, and published whole by a rename.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import IntegrityError
from ..fsatomic import building
from .blobs import Blobs
from .entry import AdapterFiles, Entry, adapter_files
from .files import hash_store_file, link_or_copy, same_file


class Views:
    """The views of the store at ``root``, made of the blobs in ``blobs``."""

    def __init__(self, root: Path, blobs: Blobs):
        self.base = root / "views"
        self.blobs = blobs

    def all(self) -> list[Path]:
        return sorted(self.base.iterdir()) if self.base.is_dir() else []

    def is_current(self, view: Path, files: AdapterFiles) -> bool:
        """Whether ``view`` holds exactly the blobs ``files`` names (see :meth:`Entry.files`)."""
        for name, (digest, size) in files.items():
            try:
                mine, blob = os.lstat(view / name), os.lstat(self.blobs.path(digest))
            except OSError:
                return False
            if same_file(mine, blob):
                continue
            if not stat.S_ISREG(mine.st_mode) or (size is not None and mine.st_size != size):
                return False
            try:
                if hash_store_file(view / name) != digest:
                    return False
            except (IntegrityError, OSError):
                return False
        return True

    def current(self, entry: Entry) -> Path | None:
        """The view of ``entry`` if it is current (caller holds the lock, shared at least)."""
        view = self.base / entry.digest
        return view if self.is_current(view, entry.files()) else None

    def build(self, entry: Entry) -> Path:
        """The view of ``entry``, made afresh from its blobs, each verified first (caller holds the exclusive lock)."""
        for digest, size in entry.files().values():
            self.blobs.read(digest, size)
        view = self.base / entry.digest
        with building(view, overwrite=True) as staging:
            for name, (digest, _) in entry.files().items():
                link_or_copy(self.blobs.path(digest), staging / name)
        return view

    def is_sound(self, view: Path) -> bool:
        """Whether ``view`` is the current view of the intact manifest blob it is named after (``verify``)."""
        try:
            return self.is_current(view, adapter_files(view.name, json.loads(self.blobs.read(view.name))))
        except (IntegrityError, ValueError, KeyError, TypeError):
            return False
