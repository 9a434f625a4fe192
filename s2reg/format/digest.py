"""sha256 digests of bytes, files and arrays (FORMAT §2: the bytes of a tensor): the one chunked hasher."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
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

    return np.ascontiguousarray(as_array(tensor)).reshape(-1).view(np.uint8).data.cast("B")


def tensor_sha256(tensor: Any) -> str:
    return sha256_bytes(tensor_bytes(tensor))
