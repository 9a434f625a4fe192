"""The safetensors file layout: an 8-byte little-endian header length, a JSON header, the data.

Read strictly by the one header parser of :mod:`s2reg.format.safetensors_header` (a truncated,
extended or overlapping shard is an error, not a short tensor) and written by s2reg itself, so a
header can be laid out before any tensor is produced and the tensors then streamed one at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, FormatError
from ..format import dtypes, safetensors_header
from ..fsread import open_regular

MAX_HEADER_BYTES = safetensors_header.CHECKPOINT_MAX_HEADER_BYTES


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, and its absolute byte range in that file."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Entries and ``__metadata__`` of the safetensors file at ``path``, strictly checked (FORMAT §6.1).

    The rules are those of every s2reg read path (:mod:`s2reg.format.safetensors_header`): in
    particular no two tensors may share bytes, so patching one in place never rewrites another.
    """
    with os.fdopen(open_regular(path, error=CheckpointError), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size

        def read_at(offset: int, n: int) -> bytes:
            fh.seek(offset)
            data = fh.read(n)
            if len(data) != n:
                raise FormatError(f"file ends at byte {offset + len(data)} while reading {n} bytes (changed underneath?)")
            return data

        try:
            header = safetensors_header.read(read_at, size, max_header_bytes=MAX_HEADER_BYTES)
        except FormatError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    entries = {
        name: TensorInfo(name, path, dtypes.to_numpy(e.dtype), e.shape, header.data_start + e.begin, header.data_start + e.end)
        for name, e in header.entries.items()
    }
    return entries, header.metadata


def layout(specs, metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) for tensors in the given order, and their data offsets."""
    return safetensors_header.encode(((spec.name, spec) for spec in specs), metadata or None, sort_keys=False)
