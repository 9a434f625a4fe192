"""The checkpoint locks: one in-place change at a time, and no copy or read taken while one is under way.

Without them, two ``merge --in-place`` runs on one checkpoint would both read the ledger, both write
a journal (the second replacing the first) and interleave their patches; a ``merge -o`` reading the
base during an in-place merge would copy half-patched shards. Each is an ``flock`` (no file is
added; the kernel drops it when the process dies, so it is never stale): on the checkpoint
directory itself, and on each shard file, because one file can belong to several directories (a
symbolic or hard link) and all names of a file share its lock. Exclusive for in-place surgery and
recovery, shared for commands that copy or read the checkpoint (spec/SURGERY.md §3). A command
that finds one taken stops at once with one line.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Protocol, Self, TypeVar

from ..errors import CheckpointError

_NO_LOCKS_HERE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}



class _FileSource(Protocol):
    """What ``locked_for_reading`` opens: a reader used in a ``with`` block that lists the files it reads
    (CheckpointSource, TorchBinSource), so their locks can be taken."""

    @property
    def files(self) -> Sequence[Path]: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


Source = TypeVar("Source", bound=_FileSource)


def directory_of(checkpoint: str | os.PathLike) -> Path:
    """The directory of a checkpoint given as its directory or as its single file."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def _take(fd: int, path: Path, *, exclusive: bool, what: str, through: str) -> None:
    """flock ``fd`` (open on ``path``) without waiting; a one-line CheckpointError when another command holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        # only an exclusive holder keeps a shared lock out; either kind keeps an exclusive one out
        doing = (f"using this {what} (copying it or changing it in place)" if exclusive
                 else f"changing this {what} in place")
        raise CheckpointError(f"{path}: another s2reg command is {doing}{through}; "
                              "run this one when it has finished") from None
    except OSError as exc:
        if exc.errno not in _NO_LOCKS_HERE:
            raise
        # a file system without flock (some FUSE mounts): the work goes on unguarded, as any other tool's would


@contextmanager
def _locked(paths: Iterable[Path], *, exclusive: bool, what: str, through: str = "") -> Iterator[None]:
    with ExitStack() as held:
        for path in paths:
            # O_NONBLOCK: opening never waits (a FIFO in place of a shard must not hang the command)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            held.callback(os.close, fd)  # closing the last descriptor releases the lock
            _take(fd, path, exclusive=exclusive, what=what, through=through)
        yield


@contextmanager
def checkpoint_lock(checkpoint: str | os.PathLike, *, exclusive: bool) -> Iterator[Path]:
    """Hold the lock of ``checkpoint`` (a directory, or a file in one) for the block; yields the directory."""
    directory = directory_of(checkpoint)
    with _locked([directory], exclusive=exclusive, what="checkpoint"):
        yield directory


def shard_locks(files: Iterable[Path], *, exclusive: bool) -> AbstractContextManager[None]:
    """Hold the lock of each shard file (its inode, whichever name reaches it) for the block.

    The directory lock keeps commands on one checkpoint apart; these keep apart commands on two
    checkpoints that reach one file (a copy made with ``cp -al``, snapshots linking into one store).
    """
    unique = list(dict.fromkeys(Path(f) for f in files))  # one file twice would conflict with itself
    return _locked(unique, exclusive=exclusive, what="shard file",
                   through=" (through another checkpoint that reaches the same file)")


@contextmanager
def locked_for_reading(checkpoint: str | os.PathLike, open_source: Callable[[Path], Source]) -> Iterator[Source]:
    """``checkpoint`` opened with ``open_source`` under the shared locks, held until the block ends: its
    directory's first (so a live in-place command is named as such, not taken for an interrupted one),
    then each of its shard files'. An in-place command cannot start on it meanwhile."""
    with checkpoint_lock(checkpoint, exclusive=False), open_source(Path(checkpoint)) as source, \
            shard_locks(source.files, exclusive=False):  # CheckpointSource and TorchBinSource list what they read
        yield source
