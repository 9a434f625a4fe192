"""Atomic filesystem writes: temp file + fsync + rename, and whole directories swapped into place.

Every file s2reg writes goes through here, so an interrupted or failing write (full disk,
read-only directory, a crash) never leaves a half-written file where a reader would find it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_directory(path: Path, files: Mapping[str, bytes], *, overwrite: bool = False) -> None:
    """Create directory ``path`` holding ``files`` (name -> bytes), all or nothing.

    The files are written and fsync'd in a temp directory beside ``path``, which is then renamed
    into place. An existing ``path`` is an error unless ``overwrite``; then it is replaced only after
    the new directory is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(17, "output already exists (pass overwrite / --force to replace it)", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, data in files.items():
            _write_synced(staging / name, data)
        fsync_dir(staging)
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, retired / "x")
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_file(path: Path, data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` atomically (temp file beside it, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
