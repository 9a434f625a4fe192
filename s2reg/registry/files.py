"""Reading and replacing store files: regular files only, never through a link, never past their size.

spec/REGISTRY.md §4: a FIFO, a device, a directory or a link where a store file belongs is an error
(never a hang or an endless read), and no more than a file's recorded size is read.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ..errors import IntegrityError
from ..format.digest import sha256_stream
from ..fsread import open_regular, read_regular


class NotRegular(IntegrityError):
    """A store file is a link, a directory, a FIFO or a device instead of a regular file."""


def read_store_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (reached without following a link); IntegrityError past ``limit``."""
    return read_regular(path, limit, follow_links=False, error=NotRegular)


def hash_store_file(path: Path) -> str:
    """sha256 of the regular file ``path`` (reached without following a link), streamed in bounded memory."""
    with os.fdopen(open_regular(path, follow_links=False, error=NotRegular), "rb") as fh:
        return sha256_stream(fh.read, what=str(path))


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two ``lstat`` results are one regular file (hard links of each other)."""
    return stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_any(path: Path) -> None:
    """Remove whatever ``path`` is (a damaged store holds directories where files belong)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied) where the filesystem allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
