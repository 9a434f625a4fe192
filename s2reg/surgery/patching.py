"""Computing and writing byte patches of touched tensors inside safetensors shards.

Shared by in-place surgery (patching a checkpoint's own shards, behind a journal) and by writing
a new checkpoint (patching fresh copies of the shards). A patch is the bytes of one tensor's
changed slice, before and after: rows of a row-major tensor are contiguous, columns strided, PISA
targets whole. Row runs are single reads and writes; column slices are gathered and scattered in
blocks of whole rows a few MiB at a time (a strided selection touches every row's pages anyway),
so memory stays bounded and a scattered channel selection costs a handful of system calls.
Patches of whole tensors are computed one at a time as they are written (:class:`PatchBytes`), so memory
holds a couple of tensors, never every patch of a merge.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..format.digest import tensor_bytes
from ..format.s2ft import take
from ..fsatomic import start_flush
from ..fsread import open_regular
from ..parallel import on_every_core, side_by_side
from ..tensors import CheckpointSource
from ..tensors.hashcache import Stamp
from ..tensors.header import TensorInfo
from .journal import Patch
from .plan import Plan, Run

_BLOCK_BYTES = 4 * 1024 * 1024


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``[start, stop)`` of sorted indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _pread(fd: int, length: int, offset: int) -> np.ndarray:
    """``length`` bytes at ``offset`` as a writable array of its own (read straight into it: no copy)."""
    data = np.empty(length, dtype=np.uint8)
    if length and os.preadv(fd, [data.data], offset) != length:
        raise CheckpointError(f"shard truncated while reading {length} bytes at offset {offset}")
    return data


def _row_blocks(info: TensorInfo):
    """``(first row, row count, file offset)`` blocks of about 4 MiB covering a rank-2 tensor."""
    row_bytes = info.nbytes // info.shape[0]
    step = max(1, _BLOCK_BYTES // max(1, row_bytes))
    for first in range(0, info.shape[0], step):
        count = min(step, info.shape[0] - first)
        yield first, count, info.start + first * row_bytes


def _read_bytes(fd: int, info: TensorInfo, axis: str | None, indices: list[int]) -> np.ndarray:
    """The slice's bytes in its own row-major order."""
    if axis is None:
        return _pread(fd, info.nbytes, info.start)
    row_bytes = info.nbytes // info.shape[0]
    if axis == "rows":
        return np.concatenate([_pread(fd, (b - a) * row_bytes, info.start + a * row_bytes) for a, b in _runs(indices)])
    cols, item, idx = info.shape[1], info.dtype.itemsize, np.asarray(indices)
    parts = [_pread(fd, count * row_bytes, offset).reshape(count, cols, item)[:, idx, :].reshape(-1)
             for _, count, offset in _row_blocks(info)]
    return np.concatenate(parts)


def patch_nbytes(info: TensorInfo, patch: Patch) -> int:
    """How many bytes ``patch`` of the tensor ``info`` holds (before, and after)."""
    if patch.indices is None:  # the whole tensor (a Patch has indices exactly when it has an axis)
        return info.nbytes
    row_bytes = info.nbytes // info.shape[0]
    return len(patch.indices) * (row_bytes if patch.axis == "rows" else info.shape[0] * info.dtype.itemsize)


def write_patch(fd: int, info: TensorInfo, patch: Patch, raw: np.ndarray) -> None:
    """Write one patch's bytes into the shard open as ``fd``; no byte outside the slice changes value."""
    axis, indices = patch.axis, patch.indices
    row_bytes = info.nbytes // info.shape[0] if info.shape else info.nbytes
    if raw.size != patch_nbytes(info, patch):
        raise CheckpointError(f"{patch.file}: patch bytes do not fit the slice of {patch.tensor}")
    if indices is None:  # the whole tensor (a Patch has indices exactly when it has an axis)
        os.pwrite(fd, raw.data, info.start)
    elif axis == "rows":
        at = 0
        for a, b in _runs(indices):
            os.pwrite(fd, raw[at:at + (b - a) * row_bytes].data, info.start + a * row_bytes)
            at += (b - a) * row_bytes
    else:  # columns are strided: read-modify-write blocks of whole rows, a few MiB at a time
        cols, item, idx = info.shape[1], info.dtype.itemsize, np.asarray(indices)
        values = raw.reshape(info.shape[0], len(indices), item)
        for first, count, offset in _row_blocks(info):
            block = _pread(fd, count * row_bytes, offset)
            block.reshape(count, cols, item)[:, idx, :] = values[first:first + count]
            os.pwrite(fd, block.data, offset)


def read_slice(source: CheckpointSource, name: str, support: tuple[str, np.ndarray]) -> np.ndarray:
    """The support slice of a tensor, read block by block from its file (never the whole tensor at once)."""
    info = source.info(name)
    axis, indices = support
    fd = open_regular(info.file, error=CheckpointError)
    try:
        data = _read_bytes(fd, info, axis, indices.tolist())
    finally:
        os.close(fd)
    shape = (indices.size, *info.shape[1:]) if axis == "rows" else (info.shape[0], indices.size)
    return data.view(info.dtype).reshape(shape)


def _as_bytes(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(tensor_bytes(array), dtype=np.uint8)


def _slice_only(plan: Plan, name: str) -> bool:
    """Whether the patch of ``name``, when it has a support slice, is computed from that slice alone (else from
    the whole tensor)."""
    return plan.permutation is None and name not in plan.expect_sha


def patch_of(plan: Plan, name: str) -> Patch:
    """The patch of tensor ``name``: its slice in the checkpoint's coordinates, or the whole tensor."""
    support, file = plan.support(name), plan.source.info(name).file.name
    return Patch(name, file, None, None) if support is None else Patch(name, file, support[0], tuple(support[1].tolist()))


def _bytes_of(run: Run, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The patch's bytes before and after (checked: NaN, inexact unmerge raise)."""
    plan = run.plan
    source, support = plan.source, plan.support(name)
    if support is not None and _slice_only(plan, name):
        before = read_slice(source, name, support)  # only the slice: the cost follows the delta
        after = plan.transform_slice(name, before, support, run)
    else:
        whole = source.array(name)
        new = plan.transform(name, whole, run)
        before, after = (whole, new) if support is None else (take(whole, *support), take(new, *support))
    return _as_bytes(before), _as_bytes(after)


class PatchBytes:
    """The before and after bytes of the patches of ``names``, handed out in that order by iterating.

    Slices are computed when this is made, on every core (reads, copies and the float math let go of the
    GIL); they are small and all held. Whole tensors (PISA, a permuted checkpoint, a checked unmerge) are
    computed as the iteration reaches them, the next one on a thread while the caller writes this one, so at
    most two are in memory. A failed check raises from the iteration, before its patch is handed out.
    ``run``: this run of the plan, whose ledger (``run.ledger_after``) is complete once every patch is.
    """

    def __init__(self, plan: Plan, names: Sequence[str], progress: Callable[[str], None]) -> None:
        self.run = Run(plan)
        self._names, self._progress = list(names), progress
        sliced = [n for n in self._names if plan.support(n) is not None and _slice_only(plan, n)]
        self._sliced = dict(zip(sliced, on_every_core(self._one, sliced), strict=True))

    def _one(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        done = _bytes_of(self.run, name)
        self._progress(name)
        return done

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        whole = iter([n for n in self._names if n not in self._sliced])
        with ThreadPoolExecutor(max_workers=1) as pool:
            def ahead():
                name = next(whole, None)
                return None if name is None else pool.submit(self._one, name)

            coming = ahead()
            for name in self._names:
                if name in self._sliced:
                    yield name, *self._sliced.pop(name)
                    continue
                before, after = coming.result()
                coming = ahead()
                yield name, before, after


def _write_shard(path: Path, jobs: Sequence[tuple[TensorInfo, Patch, Callable[[], np.ndarray]]]) -> Stamp:
    fd = os.open(path, os.O_RDWR)
    try:
        for info, patch, raw in jobs:
            write_patch(fd, info, patch, raw())
            start_flush(fd, info.start, info.nbytes)
        os.fsync(fd)  # the patched bytes reach the disk before anyone says they did
        return Stamp.of(fd)
    finally:
        os.close(fd)


def write(directory: Path, infos: dict[str, TensorInfo], patches: Sequence[Patch],
          blobs: Mapping[str, np.ndarray], which: str) -> dict[str, Stamp]:
    """Write the ``before`` or ``after`` bytes of every patch into the shards in ``directory``, and fsync;
    return the stamp of each shard written (spec/SURGERY.md §6) as it is then.

    ``blobs`` (``i.before``, ``i.after``) is read a patch at a time as it is written (a journal payload file
    hands out one tensor's bytes per read). Each shard is written and flushed on a thread of its own, and
    each patch's range is sent to the disk as soon as it is written: scattered columns dirty every page of
    their tensors, so the flush is most of an in-place merge, and this way it overlaps the writing."""
    by_file: dict[str, list[tuple[TensorInfo, Patch, Callable[[], np.ndarray]]]] = {}
    for i, patch in enumerate(patches):
        key = f"{i}.{which}"
        by_file.setdefault(patch.file, []).append((infos[patch.tensor], patch, partial(blobs.__getitem__, key)))
    files = list(by_file)
    return dict(zip(files, side_by_side(lambda file: _write_shard(directory / file, by_file[file]), files), strict=True))


def write_each(directory: Path, infos: dict[str, TensorInfo], patches: Sequence[Patch],
               after: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write each patch's ``after`` bytes into its shard in ``directory`` as ``after`` yields them (in the order
    of ``patches``: :class:`PatchBytes`), then fsync every shard written: nothing waits in memory."""
    fds: dict[str, int] = {}
    try:
        for patch, (name, _, raw) in zip(patches, after, strict=True):
            if patch.file not in fds:
                fds[patch.file] = os.open(directory / patch.file, os.O_RDWR)
            write_patch(fds[patch.file], infos[name], patch, raw)
            start_flush(fds[patch.file], infos[name].start, infos[name].nbytes)
        side_by_side(os.fsync, list(fds.values()))
    finally:
        for fd in fds.values():
            os.close(fd)


def patched_bytes(sizes: Mapping[str, int]) -> int:
    """The bytes a merge changes, from the sizes of its patches (``i.before`` / ``i.after``)."""
    return sum(n for key, n in sizes.items() if key.endswith(".after"))
