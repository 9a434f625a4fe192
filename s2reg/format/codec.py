"""Payload encodings (FORMAT §6.2): raw, and zstd over byte-plane transposed tensors."""

from __future__ import annotations

import io

import numpy as np
import zstandard

from ..errors import FormatError
from . import dtypes
from .payload import parse_header

RAW = "raw"
ZSTD_BYTEPLANE = "zstd-byteplane"
DEFAULT_LEVEL = 10


def _transpose_planes(data: bytes, *, forward: bool) -> bytes:
    """Byte-plane transpose (forward) or its inverse for every tensor region of a payload."""
    start, header, _ = parse_header(data)
    out = np.frombuffer(data, dtype=np.uint8).copy()
    for entry in header.values():
        size = dtypes.itemsize(entry["dtype"])
        begin, end = (start + o for o in entry["data_offsets"])
        if size == 1 or end == begin:
            continue
        region = out[begin:end]
        n = (end - begin) // size
        shape = (n, size) if forward else (size, n)
        out[begin:end] = region.reshape(shape).T.reshape(-1)
    return out.tobytes()


def encode(raw: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress a raw safetensors payload with the zstd-byteplane encoding."""
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True, threads=0)
    return compressor.compress(_transpose_planes(raw, forward=True))


def decode(blob: bytes, raw_bytes: int) -> bytes:
    """Decompress a zstd-byteplane payload, never producing more than ``raw_bytes`` bytes."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=False)
        with reader:
            planes = reader.read(raw_bytes + 1)
            # A stream reader may return short reads; keep reading up to the bound.
            while len(planes) <= raw_bytes and (more := reader.read(raw_bytes + 1 - len(planes))):
                planes += more
    except zstandard.ZstdError as exc:
        raise FormatError(f"compressed payload is corrupt: {exc}") from None
    if len(planes) > raw_bytes:
        raise FormatError(
            f"compressed payload decompresses past its declared size of {raw_bytes} bytes (refused: possible "
            "decompression bomb)"
        )
    if len(planes) < raw_bytes:
        raise FormatError(f"compressed payload is truncated: {len(planes)} of {raw_bytes} declared bytes")
    return _transpose_planes(planes, forward=False)
