"""The one reader and the one writer of safetensors headers (FORMAT §6.1), for every file s2reg touches.

Payloads, checkpoint shards and surgery journals are all read through :func:`read`, with the same
strict rules: the 8-byte length is bounded by a cap and by the file; the header is a UTF-8 JSON
object of bounded depth; every entry has a known dtype, a shape of non-negative integers and two
integer ``data_offsets`` whose span is exactly the tensor's bytes; the spans, sorted, tile the data
section from 0 to the end of the file with no gap, overlap, alias or trailing byte. A file in which
two tensors share bytes would let a patch of one silently rewrite the other, so it is refused.

:func:`encode` lays out the header of every file s2reg writes (payloads, journals, checkpoint shards)
before any tensor is produced, so the tensors can then be streamed one at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import FormatError
from . import boundedjson, dtypes

PAYLOAD_MAX_HEADER_BYTES = 16 * 1024 * 1024  # FORMAT §6.1
CHECKPOINT_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMENSION = 1 << 63  # a torch (int64) size; an empty tensor may have any other dimension
_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file; ``begin``/``end`` are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A checked header: where the data section starts, the entries by name, and ``__metadata__``."""

    data_start: int
    entries: dict[str, Entry]
    metadata: dict[str, str]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _byte_count(shape: list[int], itemsize: int, bound: int) -> int:
    """``prod(shape) * itemsize``, or ``bound + 1`` as soon as the product passes ``bound``.

    Stopping early keeps a hostile shape of a million 20-digit dimensions from costing a
    quadratic-time product of huge integers.
    """
    if 0 in shape:
        return 0
    count = itemsize
    for d in shape:
        count *= d
        if count > bound:
            return bound + 1
    return count


def _entry(name: str, value: object, data_length: int) -> Entry:
    if not isinstance(value, dict) or set(value) != _KEYS:
        raise FormatError(f"safetensors entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes.NAMES:
        raise FormatError(f"safetensors entry {name!r} has unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < MAX_DIMENSION for d in shape):
        raise FormatError(f"safetensors entry {name!r} has an invalid shape (integers in [0, 2**63) required)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise FormatError(f"safetensors entry {name!r}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise FormatError(f"safetensors entry {name!r}: data_offsets {offsets} must satisfy 0 <= begin <= end")
    if end > data_length:
        raise FormatError(
            f"safetensors entry {name!r}: data_offsets {offsets} run past the {data_length}-byte data section "
            "(truncated or extended file)"
        )
    if _byte_count(shape, dtypes.itemsize(dtype), end - begin) != end - begin:
        raise FormatError(f"safetensors entry {name!r}: data_offsets {offsets} do not match shape {shape} {dtype}")
    return Entry(dtype, tuple(shape), begin, end)


def parse(text: bytes, data_length: int) -> tuple[dict[str, Entry], dict[str, str]]:
    """Check a header's JSON ``text`` against a data section of ``data_length`` bytes."""
    header = boundedjson.loads(text, what="safetensors header")
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("safetensors __metadata__ must be an object mapping strings to strings")
    entries = {name: _entry(name, value, data_length) for name, value in header.items()}
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            what = "a gap" if entry.begin > position else "an overlap or alias"
            raise FormatError(f"safetensors tensor {name!r} starts at byte {entry.begin}, expected {position} ({what})")
        position = entry.end
    if position != data_length:
        raise FormatError(
            f"safetensors data section is {data_length} bytes but its tensors cover {position} "
            "(truncated or extended file)"
        )
    return entries, metadata


def read(read_at: Callable[[int, int], bytes], size: int, *, max_header_bytes: int) -> Header:
    """Read and check the header of a ``size``-byte safetensors file; ``read_at(offset, n)`` reads bytes."""
    if size < 8:
        raise FormatError(f"safetensors file is truncated: {size} bytes, not even a header length")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    if n > max_header_bytes:
        raise FormatError(f"safetensors header declares {n} bytes, over the {max_header_bytes}-byte limit")
    if 8 + n > size:
        raise FormatError(f"safetensors file is truncated: header declares {n} bytes but the file has {size - 8}")
    entries, metadata = parse(read_at(8, n), size - 8 - n)
    return Header(8 + n, entries, metadata)


def read_buffer(data: bytes | memoryview, *, max_header_bytes: int = PAYLOAD_MAX_HEADER_BYTES) -> Header:
    """:func:`read` over bytes in memory."""
    view = memoryview(data)
    return read(lambda offset, n: bytes(view[offset : offset + n]), len(view), max_header_bytes=max_header_bytes)


class TensorLayout(Protocol):
    """What the header says of a tensor (a numpy array, a checkpoint writer's plan of one)."""

    @property
    def dtype(self) -> Any: ...  # numpy's or torch's; written as its name of FORMAT §2

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...


def encode(tensors: Iterable[tuple[str, TensorLayout]], metadata: Mapping[str, str] | None, *,
           sort_keys: bool) -> tuple[bytes, list[int]]:
    """The length prefix and the space-padded compact JSON header for ``tensors`` laid out contiguously in
    the order given, and each one's offset in the data section.

    ``__metadata__`` is written unless ``metadata`` is None. ``sort_keys`` sorts every JSON object's keys,
    as FORMAT §6.1 fixes for payloads; without it, keys keep their order (``__metadata__`` first, then
    the tensors; ``dtype``, ``shape``, ``data_offsets``), the order the safetensors library writes.
    """
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offsets, offset = [], 0
    for name, tensor in tensors:
        size = tensor.nbytes
        header[name] = {"dtype": dtypes.name_of(tensor.dtype), "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offsets.append(offset)
        offset += size
    text = json.dumps(header, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets
