"""The checkpoint lock: one in-place change at a time, and no copy taken while one is under way.

Without it, two ``merge --in-place`` runs on one checkpoint would both read the ledger, both write
a journal (the second replacing the first) and interleave their patches; a ``merge -o`` reading the
base during an in-place merge would copy half-patched shards. A ``flock`` on the checkpoint
directory itself (no file is added; the kernel drops it when the process dies, so it is never
stale): exclusive for in-place surgery and recovery, shared for commands that copy the checkpoint
(spec/SURGERY.md §3). A command that finds it taken stops at once with one line.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError

_NO_LOCKS_HERE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def directory_of(checkpoint: str | os.PathLike) -> Path:
    """The directory of a checkpoint given as its directory or as its single file."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


@contextmanager
def checkpoint_lock(checkpoint: str | os.PathLike, *, exclusive: bool) -> Iterator[Path]:
    """Hold the lock of ``checkpoint`` (a directory, or a file in one) for the block; yields the directory."""
    directory = directory_of(checkpoint)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            # only an exclusive holder keeps a shared lock out; either kind keeps an exclusive one out
            doing = ("using this checkpoint (copying it or changing it in place)" if exclusive
                     else "changing this checkpoint in place")
            raise CheckpointError(f"{directory}: another s2reg command is {doing}; "
                                  "run this one when it has finished") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS_HERE:
                raise
            # a file system without flock (some FUSE mounts): the work goes on unguarded, as any other tool's would
        yield directory
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
