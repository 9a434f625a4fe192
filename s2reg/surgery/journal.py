"""The undo journal of an in-place merge or unmerge (spec/SURGERY.md §3): typed records.

``.s2reg-journal.json`` describes the patches and the ledger before and after; the bytes of every
patch, before and after, are in ``.s2reg-journal.safetensors``. Both names start with a dot, so
they are never taken for shards, and either one makes every command refuse the checkpoint until
``s2reg recover`` (:func:`s2reg.tensors.reader.leftovers`). The payload is written as its patches are
computed and read back a patch at a time (:class:`JournalPayload`): a merge of many whole tensors never
holds them all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..format import dtypes, payload, safetensors_header
from ..fsatomic import write_file, write_file_from
from ..fsread import open_regular
from ..tensors.reader import JOURNAL_NAME, JOURNAL_PAYLOAD_NAME
from .ledger import Ledger
from ..records import AXES, RECORD_VERSION, checked, int_list, require, to_bytes


@dataclass(frozen=True)
class Patch:
    """One tensor's changed bytes in a journal: its whole bytes (``axis`` None) or a row/column slice."""

    tensor: str
    file: str
    axis: str | None
    indices: tuple[int, ...] | None

    def __post_init__(self) -> None:
        if (self.axis is None) != (self.indices is None):  # the patching code reads one to know the other
            raise ValueError(f"patch of {self.tensor}: indices exactly when there is an axis")

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "file": self.file, "axis": self.axis,
                "indices": None if self.indices is None else list(self.indices)}

    @classmethod
    def from_json(cls, data: Any) -> Patch:
        require(isinstance(data, dict), "a patch must be an object")
        tensor, file, axis = data.get("tensor"), data.get("file"), data.get("axis")
        require(isinstance(tensor, str), "patch tensor must be a string")
        # recover writes into this file: a plain shard name inside the checkpoint, nothing else
        require(isinstance(file, str) and file.endswith(".safetensors") and "/" not in file and "\\" not in file
                and not file.startswith("."), f"patch file {file!r} is not a shard of the checkpoint")
        require(axis is None or axis in AXES, f"patch axis must be null, rows or columns, not {axis!r}")
        indices = None if axis is None else int_list(data.get("indices"), "patch indices")
        require(axis is not None or data.get("indices") is None, "a whole-tensor patch has no indices")
        return cls(tensor, file, axis, indices)


OPERATIONS = ("merge", "unmerge")


@dataclass(frozen=True)
class Journal:
    """The undo journal of an in-place merge or unmerge (spec/SURGERY.md §3), ``.s2reg-journal.json``.

    Patch *i*'s bytes before and after are tensors ``i.before`` and ``i.after`` of the journal
    payload, whose sha256 is ``payload_sha256``.
    """

    FORMAT = "s2reg.journal"
    NAME = JOURNAL_NAME
    PAYLOAD_NAME = JOURNAL_PAYLOAD_NAME

    operation: str
    created: str
    ledger_before: Ledger
    ledger_after: Ledger
    patches: tuple[Patch, ...]
    payload_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": RECORD_VERSION, "operation": self.operation, "created": self.created,
                "ledger_before": self.ledger_before.to_json(), "ledger_after": self.ledger_after.to_json(),
                "patches": [p.to_json() for p in self.patches], "payload_sha256": self.payload_sha256}

    @classmethod
    def from_json(cls, data: Any) -> Journal:
        data = checked(data, cls.FORMAT)
        operation, created, sha = data.get("operation"), data.get("created"), data.get("payload_sha256")
        require(operation in OPERATIONS, f"journal operation must be merge or unmerge, not {operation!r}")
        require(isinstance(created, str), "journal created must be a string")
        require(isinstance(sha, str) and len(sha) == 64, "journal payload_sha256 must be a sha256 hex digest")
        patches = data.get("patches")
        require(isinstance(patches, list), "journal patches must be a list")
        return cls(operation, created, Ledger.from_json(data.get("ledger_before")),
                   Ledger.from_json(data.get("ledger_after")), tuple(Patch.from_json(p) for p in patches), sha)


def _removed(files: tuple[Path, ...]) -> bool:
    try:
        for file in files:
            file.unlink(missing_ok=True)
    except OSError:
        return False
    return True


METADATA = {"s2reg.journal": "1"}


def _stream_payload(fh, sizes: Mapping[str, int], blobs: Iterable[tuple[str, np.ndarray]]) -> str:
    """Write the payload (U8 tensors of ``sizes``, whose bytes ``blobs`` yields in name order) into ``fh``,
    byte for byte what ``payload.dump`` makes of them; its sha256."""
    layout = {name: SimpleNamespace(dtype=np.dtype(np.uint8), shape=(n,), nbytes=n) for name, n in sizes.items()}
    digest = hashlib.sha256()
    header = payload.header_layout(layout, METADATA)
    digest.update(header)
    fh.write(header)
    names = iter(sorted(sizes))
    for name, blob in blobs:
        expected = next(names, None)
        data = np.ascontiguousarray(blob).reshape(-1).view(np.uint8).data
        if name != expected or data.nbytes != sizes[name]:  # a bug, never a user's doing: refuse the journal
            raise CheckpointError(f"journal payload: got {name} ({data.nbytes} bytes) where {expected} was due")
        digest.update(data)
        fh.write(data)
    if next(names, None) is not None:
        raise CheckpointError("journal payload: patches missing")
    return digest.hexdigest()


def write_journal(directory: Path, journal_for: Callable[[str], Journal], sizes: Mapping[str, int],
                  blobs: Iterable[tuple[str, np.ndarray]]) -> Journal:
    """Write the journal payload, the U8 tensors named in ``sizes`` as ``blobs`` yields them (in name order:
    computed as they are written), then the record ``journal_for(payload sha256)``: from then on the change
    is recoverable. Returns the record.

    If anything fails before the record is written (a full disk, a patch that fails its checks), no shard
    byte has changed yet: whatever landed is removed again, since a journal left behind would hold the
    checkpoint until ``s2reg recover``, and a disk error says so.
    """
    record, payload_path = directory / Journal.NAME, directory / Journal.PAYLOAD_NAME
    written: list[str] = []
    try:
        write_file_from(payload_path, lambda fh: written.append(_stream_payload(fh, sizes, blobs)))
        journal = journal_for(written[0])
        write_file(record, to_bytes(journal))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        said = f"{reason} in {directory} while writing the undo journal; nothing was changed"
        if not _removed((record, payload_path)):  # the record first: without it, the payload is a mere leftover
            said += f", but it could not be removed: `s2reg recover {directory}` removes it"
        raise OSError(exc.errno, said) from exc
    return journal


class JournalPayload(Mapping[str, np.ndarray]):
    """A journal payload file, strictly parsed (FORMAT §6.1), each tensor read from the file when asked for."""

    def __init__(self, path: Path) -> None:
        self._fd = open_regular(path, error=CheckpointError)
        try:
            header = safetensors_header.read(self._read_at, os.fstat(self._fd).st_size,
                                             max_header_bytes=payload.MAX_HEADER_BYTES)
        except BaseException:
            os.close(self._fd)
            raise
        self._entries, self._start = header.entries, header.data_start

    def _read_at(self, offset: int, n: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise CheckpointError(f"journal payload ends at byte {offset + len(data)} while reading {n} bytes")
        return data

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        data = np.empty(entry.end - entry.begin, dtype=np.uint8)
        if data.size and os.preadv(self._fd, [data.data], self._start + entry.begin) != data.size:
            raise CheckpointError(f"journal payload truncated in {name}")
        return data.view(dtypes.to_numpy(entry.dtype)).reshape(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> JournalPayload:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
