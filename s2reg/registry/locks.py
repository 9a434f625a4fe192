"""The store lock (spec/REGISTRY.md §1, §3): one ``flock`` on ``<root>/lock``, across processes.

Exclusive while refs, blobs or views change (push, tag, rm, gc, verify, building a view), shared while a
load or a pull reads an adapter, so a concurrent ``gc`` never removes what is being read or written.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def store_lock(root: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock of the store at ``root``: exclusive for every change, shared for reads.

    A shared lock on a store that does not exist yet locks nothing (there is nothing to read); an
    exclusive one creates the store's root.
    """
    lock = root / "lock"
    if not shared:
        root.mkdir(parents=True, exist_ok=True)
    fh: IO[bytes]
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
