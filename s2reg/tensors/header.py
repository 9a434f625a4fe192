"""The safetensors file layout: an 8-byte little-endian header length, a JSON header, the data.

Read strictly (a truncated or extended shard is an error, not a short tensor) and written by
s2reg itself, so a header can be laid out before any tensor is produced and the tensors then
streamed one at a time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..format import dtypes

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, and its absolute byte range in that file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Entries and ``__metadata__`` of the safetensors file at ``path``, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header ({n} bytes declared, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries, end_of_data = {}, 0
    for name, entry in header.items():
        try:
            dtype = dtypes.to_torch(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError, dtypes.FormatError):
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
        expected = dtype.itemsize
        for d in shape:
            expected *= d
        if begin < 0 or end - begin != expected or any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: {name}: data offsets do not match shape {list(shape)} {entry['dtype']}")
        entries[name] = TensorInfo(name, path, dtype, shape, start + begin, start + end)
        end_of_data = max(end_of_data, end)
    if start + end_of_data != size:
        raise CheckpointError(
            f"{path}: file is {size} bytes but its header describes {start + end_of_data} (truncated or extended shard)"
        )
    return entries, {str(k): str(v) for k, v in metadata.items()}


def layout(specs, metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) for tensors in the given order, and their data offsets."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets, offset = [], 0
    for spec in specs:
        header[spec.name] = {"dtype": dtypes.name_of(spec.dtype), "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offsets.append(offset)
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets
