"""Merge and unmerge in place: patch only the touched bytes of the existing safetensors shards.

Patches are computed and written by :mod:`.patching`. Before the first byte changes, an undo
journal (the original and the new bytes of every patch, the ledger before and after) is written
and fsync'd beside the shards (spec/SURGERY.md §3).
A failure while patching rolls back at once; a crash leaves the journal, every later command
refuses the checkpoint, and :func:`recover` rolls it back (or forward): the checkpoint is always
wholly the base or wholly the merged model, never a mixture.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, IntegrityError
from ..format import Adapter, payload
from ..format.digest import sha256_bytes
from ..fsatomic import fsync_dir, write_file
from ..tensors import CheckpointSource
from ..tensors.reader import JOURNAL_NAME
from . import patching
from .ledger import Ledger
from .plan import Plan, describe_plan, plan_merge, plan_unmerge

JOURNAL_PAYLOAD = ".s2reg-journal.safetensors"
JOURNAL_FORMAT = "s2reg.journal"
Progress = Callable[[str], None]


def _apply(directory: Path, journal: dict[str, Any], blobs: dict[str, torch.Tensor], which: str) -> None:
    """Write the ``before`` or ``after`` bytes of every patch and set the matching ledger."""
    with CheckpointSource(directory, allow_pending_journal=True) as source:
        infos = {p["tensor"]: source.info(p["tensor"]) for p in journal["patches"]}
    patching.write(directory, infos, journal["patches"], blobs, which)
    ledger = journal[f"ledger_{which}"]
    Ledger(ledger["merged"], ledger["original"]).write(directory)


def _drop_journal(directory: Path) -> None:
    (directory / JOURNAL_NAME).unlink(missing_ok=True)  # the commit point: no journal, nothing pending
    (directory / JOURNAL_PAYLOAD).unlink(missing_ok=True)
    fsync_dir(directory)


def _patch(plan: Plan, progress: Progress) -> dict[str, Any]:
    source = plan.source
    directory = source.directory
    started = time.perf_counter()
    patches, blobs = patching.prepare(plan, progress)
    for file in {source.info(n).file for n in plan.touched}:
        if not os.access(file, os.W_OK):
            raise PermissionError(13, "shard is not writable (in-place merge needs write access)", str(file))
    data = payload.dump(blobs, {"s2reg.journal": "1"})
    journal = {
        "format": JOURNAL_FORMAT,
        "version": 1,
        "operation": "unmerge" if plan.subtract else "merge",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ledger_before": plan.ledger_before.as_json(),
        "ledger_after": plan.ledger_after.as_json(),
        "patches": patches,
        "payload_sha256": sha256_bytes(data),
    }
    write_file(directory / JOURNAL_PAYLOAD, data)
    write_file(directory / JOURNAL_NAME, json.dumps(journal).encode())  # from here on, recoverable
    try:
        _apply(directory, journal, blobs, "after")
    except BaseException as failure:
        try:
            _apply(directory, journal, blobs, "before")
        except BaseException:  # noqa: BLE001 - any failure here leaves the journal for recover
            raise CheckpointError(
                f"{directory}: in-place write failed ({failure}) and so did the rollback; run `s2reg recover {directory}`"
            ) from failure
        _drop_journal(directory)
        raise
    _drop_journal(directory)
    return {**describe_plan(plan), "in_place": str(directory), "bytes_patched": patching.patched_bytes(blobs),
            "seconds": time.perf_counter() - started}


def merge_in_place(base: str | os.PathLike, adapters: Sequence[Adapter], *, verify_base: bool = True,
                   progress: Progress = lambda _: None) -> dict[str, Any]:
    """Merge ``adapters`` into the checkpoint ``base`` by patching its shards (journaled)."""
    with CheckpointSource(base) as source:
        return _patch(plan_merge(source, adapters, verify_base=verify_base), progress)


def unmerge_in_place(merged: str | os.PathLike, adapters: Sequence[Adapter], *, verify_base: bool = True,
                     progress: Progress = lambda _: None) -> dict[str, Any]:
    """Take ``adapters`` out of the checkpoint ``merged`` in place (journaled; exact for S2FT)."""
    with CheckpointSource(merged) as source:
        return _patch(plan_unmerge(source, adapters, verify_base=verify_base), progress)


def recover(checkpoint: str | os.PathLike, *, forward: bool = False) -> dict[str, Any]:
    """Finish an interrupted in-place operation: roll back to the state before it (default) or forward.

    A journal whose description never landed means no byte was patched: it is just removed.
    """
    directory = Path(checkpoint)
    directory = directory if directory.is_dir() else directory.parent
    file = directory / JOURNAL_NAME
    if not file.exists():
        stray = (directory / JOURNAL_PAYLOAD).exists()
        (directory / JOURNAL_PAYLOAD).unlink(missing_ok=True)
        return {"checkpoint": str(directory), "action": "cleaned" if stray else "nothing to recover"}
    try:
        journal = json.loads(file.read_text())
        if journal.get("format") != JOURNAL_FORMAT:
            raise ValueError
        data = (directory / JOURNAL_PAYLOAD).read_bytes()
    except (ValueError, OSError):
        raise CheckpointError(f"{file}: journal unreadable; restore the checkpoint from a copy") from None
    if sha256_bytes(data) != journal["payload_sha256"]:
        raise IntegrityError(f"{directory / JOURNAL_PAYLOAD}: journal payload corrupted; restore the checkpoint from a copy")
    tensors, _ = payload.load(data)
    which = "after" if forward else "before"
    _apply(directory, journal, tensors, which)
    _drop_journal(directory)
    return {"checkpoint": str(directory), "action": "rolled forward" if forward else "rolled back",
            "operation": journal["operation"], "tensors": len(journal["patches"])}


def pending(checkpoint: str | os.PathLike) -> bool:
    """Whether an interrupted in-place operation awaits :func:`recover`."""
    directory = Path(checkpoint)
    return ((directory if directory.is_dir() else directory.parent) / JOURNAL_NAME).exists()

