"""The safetensors payload: deterministic writing and strict reading (FORMAT §6.1).

s2reg writes the payload itself instead of calling ``safetensors.torch.save`` so that its bytes
are fixed by the spec (header layout, padding, tensor order) rather than by a library version.
The result is an ordinary safetensors file that any safetensors reader opens.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import torch

from ..errors import FormatError
from . import dtypes
from .digest import tensor_bytes

MAX_HEADER_BYTES = 16 * 1024 * 1024


def header_layout(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length prefix plus the padded JSON header for ``tensors`` in name order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": dtypes.name_of(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def dump(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise ``tensors`` to safetensors bytes, deterministically (FORMAT §6.1)."""
    parts = [header_layout(tensors, metadata)]
    parts.extend(bytes(tensor_bytes(tensors[name])) for name in sorted(tensors))
    return b"".join(parts)


def parse_header(data: bytes | memoryview) -> tuple[int, dict[str, dict], dict[str, str]]:
    """Check the header of a safetensors buffer; return (data start, entries by name, metadata).

    Entries are checked for dtype, shape and offsets, and the offsets must tile the data section
    exactly (no gap, overlap or trailing byte).
    """
    if len(data) < 8:
        raise FormatError(f"payload is truncated: {len(data)} bytes, not even a header length")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"payload header declares {n} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > len(data):
        raise FormatError(f"payload is truncated: header declares {n} bytes but the file has {len(data) - 8}")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"payload header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("payload header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("payload __metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"payload entry {name!r} must have exactly dtype, shape and data_offsets")
        shape, offsets = entry["shape"], entry["data_offsets"]
        size = dtypes.itemsize(entry["dtype"])
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError(f"payload entry {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[1] - offsets[0] != math.prod(shape) * size
        ):
            raise FormatError(f"payload entry {name!r} has data_offsets {offsets!r} that do not match its shape")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise FormatError(f"payload tensor {name!r} starts at {begin}, expected {position} (gap or overlap)")
        position = end
    if 8 + n + position != len(data):
        raise FormatError(
            f"payload data section is {len(data) - 8 - n} bytes but its tensors cover {position} "
            "(truncated or trailing bytes)"
        )
    return 8 + n, header, metadata


def load(data: bytes | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors buffer into tensors (copies, independent of ``data``) and metadata."""
    start, header, metadata = parse_header(data)
    view = memoryview(data)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = bytearray(view[start + begin : start + end])
        dtype = dtypes.to_torch(entry["dtype"])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(entry["shape"])
    return tensors, metadata
