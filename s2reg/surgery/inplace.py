"""Merge and unmerge in place: patch only the touched bytes of the existing safetensors shards.

Row slices of a row-major tensor are contiguous byte ranges; column slices are one short range
per row. Before the first byte changes, an undo journal (the original and the new bytes of every
range, the ledger before and after) is written and fsync'd beside the shards (spec/SURGERY.md §3).
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
from ..format.digest import sha256_bytes, tensor_bytes
from ..format.s2ft import take
from ..fsatomic import fsync_dir, write_file
from ..tensors import CheckpointSource
from ..tensors.header import TensorInfo
from ..tensors.reader import JOURNAL_NAME
from .ledger import Ledger
from .plan import Plan, describe_plan, plan_merge, plan_unmerge

JOURNAL_PAYLOAD = ".s2reg-journal.safetensors"
JOURNAL_FORMAT = "s2reg.journal"
Progress = Callable[[str], None]
Support = tuple[str, torch.Tensor] | None
_COLUMN_GAP_BYTES = 512


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def byte_ranges(info: TensorInfo, axis: str | None, indices: list[int] | None) -> list[tuple[int, int]]:
    """``(file offset, length)`` of the slice's bytes, in the row-major order of the slice itself."""
    if axis is None:
        return [(info.start, info.nbytes)]
    if axis == "rows":
        row = info.nbytes // info.shape[0]
        return [(info.start + a * row, (b - a) * row) for a, b in _runs(indices)]
    rows, cols = info.shape
    item = info.dtype.itemsize
    runs = _runs(indices)
    return [(info.start + (r * cols + a) * item, (b - a) * item) for r in range(rows) for a, b in runs]


def _coalesced(support: Support, itemsize: int) -> Support:
    """A column support with small gaps filled: one range per row instead of one per run.

    The filled columns are rewritten with their own bytes, so nothing changes there; what is
    saved is hundreds of thousands of tiny reads and writes on a scattered channel selection.
    """
    if support is None or support[0] != "columns":
        return support
    gap = max(1, _COLUMN_GAP_BYTES // itemsize)
    filled: list[int] = []
    for i in support[1].tolist():
        if filled and i - filled[-1] <= gap:
            filled.extend(range(filled[-1] + 1, i + 1))
        else:
            filled.append(i)
    return "columns", torch.tensor(filled, dtype=torch.long)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(tensor_bytes(tensor)), dtype=torch.uint8)


def _slice_bytes(tensor: torch.Tensor, support: Support) -> torch.Tensor:
    return _as_bytes(tensor if support is None else take(tensor, support[0], support[1]))


def _read_slice(source: CheckpointSource, name: str, support: tuple[str, torch.Tensor]) -> torch.Tensor:
    """The support slice of a tensor, read range by range from its file."""
    info = source.info(name)
    axis, indices = support
    ranges = byte_ranges(info, axis, indices.tolist())
    data = bytearray(sum(length for _, length in ranges))
    view, at = memoryview(data), 0
    with open(info.file, "rb") as fh:
        fd = fh.fileno()
        for offset, length in ranges:
            if os.preadv(fd, [view[at:at + length]], offset) != length:
                raise CheckpointError(f"{info.file}: truncated while reading {name}")
            at += length
    shape = (indices.numel(), *info.shape[1:]) if axis == "rows" else (info.shape[0], indices.numel())
    return torch.frombuffer(data, dtype=info.dtype).reshape(shape) if data else torch.empty(shape, dtype=info.dtype)


def _write_ranges(fds: dict[Path, int], file: Path, ranges: list[tuple[int, int]], data: bytes) -> None:
    fd = fds.get(file)
    if fd is None:
        fd = fds[file] = os.open(file, os.O_RDWR)
    view, at = memoryview(data), 0
    for offset, length in ranges:
        os.pwrite(fd, view[at:at + length], offset)
        at += length
    if at != len(data):
        raise CheckpointError(f"{file}: journal bytes do not fit the patch ranges")


def _apply(directory: Path, journal: dict[str, Any], tensors: dict[str, torch.Tensor], which: str) -> None:
    """Write the ``before`` or ``after`` bytes of every patch, fsync, and set the matching ledger."""
    with CheckpointSource(directory, allow_pending_journal=True) as source:
        fds: dict[Path, int] = {}
        try:
            for i, patch in enumerate(journal["patches"]):
                info = source.info(patch["tensor"])
                ranges = byte_ranges(info, patch["axis"], patch["indices"])
                _write_ranges(fds, info.file, ranges, tensors[f"{i}.{which}"].numpy().tobytes())
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
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
    patches, blobs = [], {}
    for i, name in enumerate(sorted(plan.touched)):
        support = _coalesced(plan.support(name), source.dtype(name).itemsize)
        if support is not None and plan.permutation is None and name not in plan.expect_sha:
            # Only the slice's bytes are read: the cost follows the delta, not the tensor.
            before = _read_slice(source, name, support)
            after = plan.transform_slice(name, before, support)
            blobs[f"{i}.before"], blobs[f"{i}.after"] = _as_bytes(before), _as_bytes(after)
        else:
            whole = source.get(name)
            new = plan.transform(name, whole)  # raises (NaN, bad unmerge) before anything is written
            blobs[f"{i}.before"], blobs[f"{i}.after"] = _slice_bytes(whole, support), _slice_bytes(new, support)
        patches.append({
            "tensor": name,
            "file": source.info(name).file.name,
            "axis": None if support is None else support[0],
            "indices": None if support is None else support[1].tolist(),
        })
        progress(name)
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
        except BaseException:
            raise CheckpointError(
                f"{directory}: in-place write failed ({failure}) and so did the rollback; run `s2reg recover {directory}`"
            ) from failure
        _drop_journal(directory)
        raise
    _drop_journal(directory)
    patched = sum(len(b) for k, b in blobs.items() if k.endswith(".after"))
    return {**describe_plan(plan), "in_place": str(directory), "bytes_patched": patched,
            "seconds": time.perf_counter() - started}


def merge_in_place(base: str | os.PathLike, adapters: Sequence[Adapter], *, force: bool = False,
                   progress: Progress = lambda _: None) -> dict[str, Any]:
    """Merge ``adapters`` into the checkpoint ``base`` by patching its shards (journaled)."""
    with CheckpointSource(base) as source:
        return _patch(plan_merge(source, adapters, force=force), progress)


def unmerge_in_place(merged: str | os.PathLike, adapters: Sequence[Adapter], *, force: bool = False,
                     progress: Progress = lambda _: None) -> dict[str, Any]:
    """Take ``adapters`` out of the checkpoint ``merged`` in place (journaled; exact for S2FT)."""
    with CheckpointSource(merged) as source:
        return _patch(plan_unmerge(source, adapters, force=force), progress)


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

