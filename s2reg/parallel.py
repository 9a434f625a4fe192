"""Work on every core at once, for calls that let go of the GIL: hashing, positional reads, numpy copies."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def on_every_core(work: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """``[work(item) for item in items]``, run on a thread per core; the first failure (in order) is raised.

    ``work`` must be thread-safe: every tensor source's reads are (checkpoints use positional reads)."""
    if len(items) < 2:
        return [work(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(work, items))
