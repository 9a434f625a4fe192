"""Merge and unmerge in place: patch only the touched bytes of the existing safetensors shards.

Patches are computed and written by :mod:`.patching`. Before the first byte changes, an undo
journal (the original and the new bytes of every patch, the ledger before and after) is written
and fsync'd beside the shards (spec/SURGERY.md §3): each patch goes into it as soon as it is computed,
and the shards are then written from it, a patch at a time, so memory never holds every patch.
A failure while patching rolls back at once; a crash leaves the journal, every later command
refuses the checkpoint, and :func:`recover` rolls it back (or forward): the checkpoint is always
wholly the base or wholly the merged model, never a mixture.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, IntegrityError
from ..format import Adapter
from ..format.digest import sha256_file
from ..fsatomic import fsync_dir
from ..tensors import CheckpointSource
from ..tensors.hashcache import Stamp
from ..tensors.reader import leftovers
from . import patching
from .journal import Journal, JournalPayload, write_journal
from .lock import checkpoint_lock, directory_of, shard_locks
from .plan import Plan, describe_plan, plan_merge, plan_unmerge
from .results import InPlaceResult, RecoverResult
from .sharing import own_shards
from ..records import read_record

Progress = Callable[[str], None]


def _apply(directory: Path, journal: Journal, blobs: Mapping[str, np.ndarray], which: str) -> dict[str, Stamp]:
    """Write the ``before`` or ``after`` bytes of every patch and set the matching ledger; the shards' stamps."""
    with CheckpointSource(directory, allow_pending_journal=True) as source:
        infos = {p.tensor: source.info(p.tensor) for p in journal.patches}
    stamps = patching.write(directory, infos, journal.patches, blobs, which)
    (journal.ledger_after if which == "after" else journal.ledger_before).write(directory)
    return stamps


def _remember_restored(plan: Plan, stamps: dict[str, Stamp]) -> None:
    """An unmerge that gave tensors their original bytes back knows their sha256 (checked before writing,
    spec/SURGERY.md §2 rule 5): remembered for the next base check (§6). A permuted checkpoint's
    stored bytes are not the original order those hashes are of."""
    cache = plan.source.hash_cache
    if cache is None or plan.permutation is not None:
        return
    for name, sha in plan.expect_sha.items():
        info = plan.source.info(name)
        cache.remember(info.file, stamps[info.file.name], (info.start, info.end), sha)


def _drop_journal(directory: Path) -> None:
    (directory / Journal.NAME).unlink(missing_ok=True)  # the commit point: no journal, nothing pending
    (directory / Journal.PAYLOAD_NAME).unlink(missing_ok=True)
    fsync_dir(directory)


def _journaled(plan: Plan, progress: Progress) -> dict[str, int]:
    """Compute the patches into the journal, patch the shards from it (rolled back at once on failure); the
    size of each patch's bytes (``i.before``, ``i.after``)."""
    source = plan.source
    directory = source.directory
    names = sorted(plan.touched)
    patches = [patching.patch_of(plan, name) for name in names]
    sizes = {f"{i}.{which}": patching.patch_nbytes(source.info(p.tensor), p)
             for i, p in enumerate(patches) for which in ("before", "after")}
    for file in {source.info(n).file for n in plan.touched}:
        if not os.access(file, os.W_OK):
            raise PermissionError(13, "shard is not writable (in-place merge needs write access)", str(file))
    order = sorted(range(len(names)), key=str)  # the payload holds its tensors in name order: "10.after" < "2.after"
    computed = patching.PatchBytes(plan, [names[i] for i in order], progress)

    def blobs():
        for i, (_, before, after) in zip(order, computed, strict=True):
            yield f"{i}.after", after
            yield f"{i}.before", before

    journal = write_journal(directory, lambda sha: Journal(
        operation="unmerge" if plan.subtract else "merge",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ledger_before=plan.ledger_before,
        ledger_after=computed.run.ledger_after,  # made once every patch is computed into the payload
        patches=tuple(patches),
        payload_sha256=sha,
    ), sizes, blobs())  # from here on, recoverable
    with JournalPayload(directory / Journal.PAYLOAD_NAME) as written:
        try:
            stamps = _apply(directory, journal, written, "after")
        except BaseException as failure:
            try:
                _apply(directory, journal, written, "before")
            except BaseException:  # noqa: BLE001 - any failure here leaves the journal for recover
                raise CheckpointError(
                    f"{directory}: in-place write failed ({failure}) and so did the rollback; run `s2reg recover {directory}`"
                ) from failure
            _drop_journal(directory)
            raise
    _drop_journal(directory)
    _remember_restored(plan, stamps)
    return sizes


def _patch(plan: Plan, progress: Progress, break_links: bool) -> InPlaceResult:
    """Patch the shards the plan touches, each reached by this checkpoint's name alone (spec/SURGERY.md §3,
    "Shared shard files") and locked against every other command that reaches it."""
    started = time.perf_counter()
    directory = plan.source.directory
    files = sorted({plan.source.info(n).file for n in plan.touched})
    copied = own_shards(directory, files, break_links=break_links, operation="unmerge" if plan.subtract else "merge")
    with shard_locks(files, exclusive=True):
        sizes = _journaled(plan, progress)
    return InPlaceResult(**vars(describe_plan(plan)), in_place=str(directory), bytes_patched=patching.patched_bytes(sizes),
                         links_broken=tuple(copied), seconds=time.perf_counter() - started)


def merge_in_place(base: str | os.PathLike, adapters: Sequence[Adapter], *, verify_base: bool = True,
                   break_links: bool = False, progress: Progress = lambda _: None) -> InPlaceResult:
    """Merge ``adapters`` into the checkpoint ``base`` by patching its shards (journaled).

    A shard another name also reaches (a symbolic or hard link) is refused, or with ``break_links``
    first copied into ``base``."""
    with checkpoint_lock(base, exclusive=True), CheckpointSource(base, remember_hashes=True) as source:
        return _patch(plan_merge(source, adapters, verify_base=verify_base), progress, break_links)


def unmerge_in_place(merged: str | os.PathLike, adapters: Sequence[Adapter], *, verify_base: bool = True,
                     break_links: bool = False, progress: Progress = lambda _: None) -> InPlaceResult:
    """Take ``adapters`` out of the checkpoint ``merged`` in place (journaled; exact for S2FT; shared
    shards as :func:`merge_in_place`)."""
    with checkpoint_lock(merged, exclusive=True), CheckpointSource(merged, remember_hashes=True) as source:
        return _patch(plan_unmerge(source, adapters, verify_base=verify_base), progress, break_links)


def _remove(files: Sequence[Path], directory: Path) -> list[str]:
    for file in files:
        file.unlink(missing_ok=True)
    fsync_dir(directory)
    return [f.name for f in files]


def recover(checkpoint: str | os.PathLike, *, forward: bool = False) -> RecoverResult:
    """Finish an interrupted in-place operation: roll back to the state before it (default) or forward.

    Without the journal's JSON no shard byte differs from what the ledger says (it never landed, or
    the operation had committed): the journal payload and temp files are just removed. With nothing
    left over, nothing is written (a read-only checkpoint is fine).
    """
    with checkpoint_lock(checkpoint, exclusive=True) as directory:  # never under a live in-place command
        found = leftovers(directory)
        if not found:
            return RecoverResult(str(directory), "nothing to recover")
        file = directory / Journal.NAME
        if not file.exists():
            return RecoverResult(str(directory), "cleaned", removed=tuple(_remove(found, directory)))
        journal = read_record(file, Journal.from_json)
        try:
            sha = sha256_file(directory / Journal.PAYLOAD_NAME)  # streamed: the payload can be most of a model
        except OSError:
            raise CheckpointError(f"{file}: its payload {Journal.PAYLOAD_NAME} is missing; "
                                  "restore the checkpoint from a copy") from None
        if sha != journal.payload_sha256:
            raise IntegrityError(f"{directory / Journal.PAYLOAD_NAME}: journal payload corrupted; "
                                 "restore the checkpoint from a copy")
        which = "after" if forward else "before"
        # no sharing check: the interrupted command already changed these bytes, and restoring them fixes every name
        with shard_locks(sorted({directory / p.file for p in journal.patches}), exclusive=True), \
                JournalPayload(directory / Journal.PAYLOAD_NAME) as tensors:
            _apply(directory, journal, tensors, which)
        removed = _remove([f for f in found if f.name not in (Journal.NAME, Journal.PAYLOAD_NAME)], directory)
        _drop_journal(directory)
        return RecoverResult(str(directory), "rolled forward" if forward else "rolled back", removed=tuple(removed),
                             operation=journal.operation, tensors=len(journal.patches))


def pending(checkpoint: str | os.PathLike) -> bool:
    """Whether an interrupted command left something that :func:`recover` must deal with first."""
    return bool(leftovers(directory_of(checkpoint)))
