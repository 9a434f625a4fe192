"""The undo journal of an in-place merge or unmerge (spec/SURGERY.md §3): typed records.

``.s2reg-journal.json`` describes the patches and the ledger before and after; the bytes of every
patch, before and after, are in ``.s2reg-journal.safetensors``. Both names start with a dot, so
they are never taken for shards, and either one makes every command refuse the checkpoint until
``s2reg recover`` (:func:`s2reg.tensors.reader.leftovers`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsatomic import write_file
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


def write_journal(directory: Path, journal: Journal, data: bytes) -> None:
    """Write the journal payload ``data``, then the record ``journal``: from then on the change is recoverable.

    If either write fails (a full disk), no shard byte has changed yet: whatever landed is removed again,
    since a journal left behind would hold the checkpoint until ``s2reg recover``, and the error says so.
    """
    record, payload = directory / Journal.NAME, directory / Journal.PAYLOAD_NAME
    try:
        write_file(payload, data)
        write_file(record, to_bytes(journal))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        said = f"{reason} in {directory} while writing the undo journal; nothing was changed"
        if not _removed((record, payload)):  # the record first: without it, the payload is a mere leftover
            said += f", but it could not be removed: `s2reg recover {directory}` removes it"
        raise OSError(exc.errno, said) from exc
