"""Computing and writing byte patches of touched tensors inside safetensors shards.

Shared by in-place surgery (patching a checkpoint's own shards, behind a journal) and by writing
a new checkpoint (patching fresh copies of the shards). A patch is the bytes of one tensor's
changed slice, before and after: rows of a row-major tensor are contiguous, columns strided, PISA
targets whole. Slices are read and written through memory maps, so a scattered channel selection
costs one vectorised gather or assignment, and only the slice's bytes are touched.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..format.digest import tensor_bytes
from ..format.s2ft import take
from ..tensors import CheckpointSource
from ..tensors.header import TensorInfo
from .plan import Plan

Patches = tuple[list[dict[str, Any]], dict[str, torch.Tensor]]


def _region(buffer, info: TensorInfo, axis: str | None, indices: list[int] | None) -> tuple[np.ndarray, tuple]:
    """A uint8 view of a tensor's bytes inside ``buffer``, and the index selecting the slice's bytes.

    ``view[index]`` holds the slice's bytes in its own row-major order; assigning to it writes
    exactly those bytes and no other.
    """
    flat = np.frombuffer(buffer, dtype=np.uint8, count=info.nbytes, offset=info.start)
    if axis is None:
        return flat, (slice(None),)
    idx = np.asarray(indices, dtype=np.int64)
    if axis == "rows":
        return flat.reshape(info.shape[0], -1), (idx,)
    return flat.reshape(info.shape[0], info.shape[1], info.dtype.itemsize), (slice(None), idx)


def read_slice(source: CheckpointSource, name: str, support: tuple[str, torch.Tensor]) -> torch.Tensor:
    """The support slice of a tensor, gathered from a read-only map of its file (no whole-tensor read)."""
    info = source.info(name)
    axis, indices = support
    with open(info.file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view, index = _region(mapped, info, axis, indices.tolist())
        data = bytearray(np.ascontiguousarray(view[index]).tobytes())
        del view
    shape = (indices.numel(), *info.shape[1:]) if axis == "rows" else (info.shape[0], indices.numel())
    return torch.frombuffer(data, dtype=info.dtype).reshape(shape) if data else torch.empty(shape, dtype=info.dtype)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(tensor_bytes(tensor)), dtype=torch.uint8)


def prepare(plan: Plan, progress: Callable[[str], None]) -> Patches:
    """Every patch of ``plan`` with its before/after bytes; raises (NaN, inexact unmerge) before any write."""
    source = plan.source
    patches, blobs = [], {}
    for i, name in enumerate(sorted(plan.touched)):
        support = plan.support(name)
        if support is not None and plan.permutation is None and name not in plan.expect_sha:
            before = read_slice(source, name, support)  # only the slice: the cost follows the delta
            after = plan.transform_slice(name, before, support)
        else:
            whole = source.get(name)
            new = plan.transform(name, whole)
            before, after = (whole, new) if support is None else (take(whole, *support), take(new, *support))
        blobs[f"{i}.before"], blobs[f"{i}.after"] = _as_bytes(before), _as_bytes(after)
        patches.append({
            "tensor": name,
            "file": source.info(name).file.name,
            "axis": None if support is None else support[0],
            "indices": None if support is None else support[1].tolist(),
        })
        progress(name)
    return patches, blobs


def write(directory: Path, infos: dict[str, TensorInfo], patches: list[dict[str, Any]],
          blobs: dict[str, torch.Tensor], which: str) -> None:
    """Write the ``before`` or ``after`` bytes of every patch into the shards in ``directory``, and msync."""
    with ExitStack() as stack:
        maps: dict[str, mmap.mmap] = {}
        for i, patch in enumerate(patches):
            info = infos[patch["tensor"]]
            if patch["file"] not in maps:
                fh = stack.enter_context(open(directory / patch["file"], "r+b"))
                maps[patch["file"]] = stack.enter_context(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_WRITE))
            write_patch(maps[patch["file"]], info, patch, blobs[f"{i}.{which}"])
        for mapped in maps.values():
            mapped.flush()  # msync: the patched pages reach the file before anyone says they did


def write_patch(mapped: mmap.mmap, info: TensorInfo, patch: dict[str, Any], data: torch.Tensor) -> None:
    view, index = _region(mapped, info, patch["axis"], patch["indices"])
    target = view[index]
    if target.size != data.numel():
        raise CheckpointError(f"{patch['file']}: patch bytes do not fit the slice of {patch['tensor']}")
    view[index] = data.numpy().reshape(target.shape)


def patched_bytes(blobs: dict[str, torch.Tensor]) -> int:
    return sum(b.numel() for k, b in blobs.items() if k.endswith(".after"))
