"""Payload encodings (FORMAT §6.2): raw, and zstd over byte-plane transposed tensors."""

from __future__ import annotations

import numpy as np
import zstandard

from ..errors import FormatError
from . import dtypes
from .limits import MAX_DECOMPRESSED
from .payload import parse_header

RAW = "raw"
ZSTD_BYTEPLANE = "zstd-byteplane"
DEFAULT_LEVEL = 10
# zstd's own ceiling: an RLE block turns 4 bytes into at most 128 KiB, so no frame inflates more.
MAX_RATIO = 32 * 1024
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _transpose_planes(data: bytes, *, forward: bool) -> bytes:
    """Byte-plane transpose (forward) or its inverse for every tensor region of a payload."""
    header = parse_header(data)
    out = np.frombuffer(data, dtype=np.uint8).copy()
    for entry in header.entries.values():
        size = dtypes.itemsize(entry.dtype)
        begin, end = header.data_start + entry.begin, header.data_start + entry.end
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


def _frame_length(blob: bytes) -> int:
    """The length of the zstd frame at the start of ``blob``, from its block headers (RFC 8878 §3.1.1)."""
    if blob[:4] != _ZSTD_MAGIC:
        raise FormatError("compressed payload does not start with a zstd frame (skippable frames are refused)")
    try:
        params = zstandard.get_frame_parameters(blob)
        position = zstandard.frame_header_size(blob)
    except zstandard.ZstdError as exc:
        raise FormatError(f"compressed payload has a corrupt zstd frame header: {exc}") from None
    while True:
        if position + 3 > len(blob):
            raise FormatError("compressed payload is truncated inside its zstd frame")
        word = int.from_bytes(blob[position : position + 3], "little")
        last, kind, size = word & 1, (word >> 1) & 3, word >> 3
        if kind == 3:
            raise FormatError("compressed payload has a reserved zstd block type")
        position += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        if last:
            return position + (4 if params.has_checksum else 0)


def decode(blob: bytes, raw_bytes: int) -> bytes:
    """Decompress a zstd-byteplane payload of declared size ``raw_bytes`` (FORMAT §6.2).

    Every bound is checked before anything is allocated: the frame must be the only one in the
    file, declare ``raw_bytes`` as its content size, which must be within :data:`MAX_RATIO` times the
    compressed size and within :data:`~s2reg.format.limits.MAX_DECOMPRESSED`, and carry a content checksum.
    """
    MAX_DECOMPRESSED.check(raw_bytes, "the compressed payload declares")
    if raw_bytes > MAX_RATIO * len(blob):
        raise FormatError(
            f"payload declares {raw_bytes} decompressed bytes from {len(blob)} compressed, more than zstd's "
            f"{MAX_RATIO}:1 (refused: possible decompression bomb)"
        )
    length = _frame_length(blob)
    if length != len(blob):
        raise FormatError(
            f"compressed payload is not exactly one zstd frame ({len(blob) - length} bytes after it; FORMAT §6.2)"
            if length < len(blob) else "compressed payload is truncated inside its zstd frame"
        )
    declared = zstandard.frame_content_size(blob)
    if declared != raw_bytes:
        raise FormatError(
            f"compressed payload's frame declares {'no' if declared < 0 else declared} content size, the manifest "
            f"says raw_bytes {raw_bytes} (refused: truncated, or a possible decompression bomb)"
        )
    if not zstandard.get_frame_parameters(blob).has_checksum:
        raise FormatError("compressed payload's zstd frame has no content checksum (FORMAT §6.2 requires one)")
    try:
        planes = zstandard.ZstdDecompressor().decompress(blob)
    except zstandard.ZstdError as exc:
        raise FormatError(f"compressed payload is corrupt: {exc}") from None
    if len(planes) != raw_bytes:  # libzstd checks the declared size; this keeps the rule visible here
        raise FormatError(f"compressed payload decodes to {len(planes)} bytes, not the declared {raw_bytes}")
    return _transpose_planes(planes, forward=False)
