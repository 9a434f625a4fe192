"""sha256 digests of bytes, files and arrays (FORMAT §2: the bytes of a tensor): the one chunked hasher."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CHUNK = 1 << 22


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(read: Callable[[int], bytes], length: int | None = None, *, what: str = "file") -> str:
    """sha256 of ``length`` bytes (or everything) that ``read(n)`` returns, a chunk at a time.

    ``EOFError`` when the stream ends before ``length`` bytes (a file changed underneath).
    """
    h = hashlib.sha256()
    left = length
    while left is None or left:
        chunk = read(CHUNK if left is None else min(CHUNK, left))
        if not chunk:
            if left is None:
                break
            raise EOFError(f"{what}: truncated while hashing")
        h.update(chunk)
        if left is not None:
            left -= len(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh.read, what=str(path))


def tensor_bytes(tensor: Any) -> memoryview:
    """The tensor's bytes as safetensors stores them: row-major, little-endian, no copy if contiguous."""
    import numpy as np

    from .arrays import as_array

    return memoryview(np.ascontiguousarray(as_array(tensor)).reshape(-1).view(np.uint8)).cast("B")


def tensor_sha256(tensor: Any) -> str:
    return sha256_bytes(tensor_bytes(tensor))


def on_every_core(digest: Callable[[str], str], names: Sequence[str]) -> dict[str, str]:
    """``{name: digest(name)}``, hashed on every core at once: hashlib lets go of the GIL while it hashes,
    and checking a base's fingerprints is most of what validate and merge do. ``digest`` must be thread-safe
    (every tensor source's ``sha256_of`` is: checkpoints are read with positional reads)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(names) < 2:
        return {n: digest(n) for n in names}
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(digest, names)))
