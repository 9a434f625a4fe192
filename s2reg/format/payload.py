"""The safetensors payload: deterministic writing and strict reading (FORMAT §6.1).

s2reg writes the payload itself instead of calling ``safetensors.torch.save`` so that its bytes
are fixed by the spec (header layout, padding, tensor order) rather than by a library version.
The result is an ordinary safetensors file that any safetensors reader opens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import dtypes, safetensors_header
from .digest import tensor_bytes

MAX_HEADER_BYTES = safetensors_header.PAYLOAD_MAX_HEADER_BYTES


def header_layout(tensors: Mapping[str, safetensors_header.TensorLayout], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length prefix plus the padded JSON header for ``tensors`` in name order, keys sorted."""
    header, _ = safetensors_header.encode(((name, tensors[name]) for name in sorted(tensors)), metadata, sort_keys=True)
    return header


def dump(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Serialise ``tensors`` to safetensors bytes, deterministically (FORMAT §6.1)."""
    parts = [header_layout(tensors, metadata)]
    parts.extend(bytes(tensor_bytes(tensors[name])) for name in sorted(tensors))
    return b"".join(parts)


def parse_header(data: bytes | memoryview) -> safetensors_header.Header:
    """The checked header of a payload buffer (FORMAT §6.1; the one parser every reader shares)."""
    return safetensors_header.read_buffer(data, max_header_bytes=MAX_HEADER_BYTES)


def load(data: bytes | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors buffer into arrays (copies, independent of ``data``) and metadata."""
    header = parse_header(data)
    view = memoryview(data)
    tensors = {}
    for name, entry in header.entries.items():
        raw = view[header.data_start + entry.begin : header.data_start + entry.end]
        tensors[name] = np.frombuffer(raw, dtype=dtypes.to_numpy(entry.dtype)).reshape(entry.shape).copy()
    return tensors, header.metadata
