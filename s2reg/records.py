"""Reading and writing the sidecar files surgery keeps beside a checkpoint (spec/SURGERY.md §2-§4).

Each is a typed record (a frozen dataclass with ``to_json``/``from_json``) stored as a JSON object
``{"format": ..., "version": N, ...}``. Reading checks the format name, refuses a version newer
than this s2reg writes (one line saying so), and checks the type of every field, so code past
``from_json`` works with dataclasses, never raw dicts. The records: the merge ledger
(:mod:`s2reg.surgery.ledger`, with its rules), the undo journal (:mod:`s2reg.surgery.journal`), and
the permutation record (:mod:`s2reg.ops.permute`, beside the permutation it holds).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from ._version import __version__
from .errors import CheckpointError
from .fsread import read_json

RECORD_VERSION = 1  # the version of every record below that this s2reg writes and reads
AXES = ("rows", "columns")


class RecordError(CheckpointError):
    """A sidecar record is malformed (raised with the file named by :func:`read_record`)."""


def require(ok: bool, what: str) -> None:
    if not ok:
        raise RecordError(what)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_list(value: Any, what: str) -> tuple[int, ...]:
    require(isinstance(value, list) and all(is_int(i) for i in value), f"{what} must be a list of integers")
    return tuple(value)


def checked(data: Any, format_name: str) -> Mapping[str, Any]:
    """``data`` as a record of ``format_name`` this s2reg can read (version checked)."""
    require(isinstance(data, dict) and data.get("format") == format_name, f"not a {format_name} record")
    version = data.get("version")
    require(is_int(version) and version >= 1, "version must be a positive integer")
    if version > RECORD_VERSION:
        raise RecordError(
            f"{format_name} version {version} was written by a newer s2reg (s2reg {__version__} reads version "
            f"{RECORD_VERSION}); upgrade s2reg to read it"
        )
    return data


def read_record(file: Path, from_json):
    """Parse ``file`` with ``from_json``; any defect becomes one line naming the file."""
    try:
        return from_json(read_json(file, error=CheckpointError))  # a defect in the JSON itself names the file
    except RecordError as exc:
        raise CheckpointError(f"{file}: {exc} (spec/SURGERY.md)") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}); spec/SURGERY.md") from None


def to_bytes(record: Any) -> bytes:
    return (json.dumps(record.to_json(), indent=2) + "\n").encode()
