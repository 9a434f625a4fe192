"""Work on threads, for calls that let go of the GIL: hashing, positional reads and writes, numpy copies, fsync."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_MOSTLY_WAITING = 8  # threads for calls that mostly wait on the disk: a thread each, within reason


def _on_threads(work: Callable[[Item], Result], items: Sequence[Item], threads: int) -> list[Result]:
    if len(items) < 2 or threads < 2:
        return [work(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), threads)) as pool:
        return list(pool.map(work, items))


def on_every_core(work: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """``[work(item) for item in items]``, run on a thread per core; the first failure (in order) is raised
    once every call has ended.

    ``work`` must be thread-safe: every tensor source's reads are (checkpoints use positional reads)."""
    return _on_threads(work, items, os.cpu_count() or 1)


def side_by_side(work: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """Like :func:`on_every_core`, but a thread per item (up to eight), for work that mostly waits on the
    disk (writing and fsyncing files): one file's flush goes on while the next file is written."""
    return _on_threads(work, items, _MOSTLY_WAITING)
