"""sha256 digests of bytes, files and tensors (FORMAT §2: the bytes of a tensor)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

_CHUNK = 1 << 22


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as safetensors stores them: row-major, little-endian, no copy if contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_sha256(tensor: torch.Tensor) -> str:
    return sha256_bytes(tensor_bytes(tensor))
