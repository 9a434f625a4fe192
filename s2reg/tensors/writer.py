"""Streaming, sharded, atomic writing of checkpoints in the Hugging Face layout.

Every shard's header is laid out from the tensor specs before any tensor exists; tensors are then
produced one at a time and their bytes appended, so peak memory is one tensor. The whole output
directory is assembled beside its destination and renamed into place at the end, so a failure
(full disk, a refused tensor, an interrupt) never leaves a half-written checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..format import dtypes
from ..format.digest import tensor_bytes
from ..fsatomic import building
from .header import layout
from .reader import INDEX_NAME, SINGLE_NAME

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: Any  # numpy's or torch's: only its format name and item size are used

    @property
    def nbytes(self) -> int:
        n = dtypes.itemsize(dtypes.name_of(self.dtype))
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, name: str, tensor: Any) -> TensorSpec:
        return cls(name, tuple(tensor.shape), tensor.dtype)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, list[TensorSpec]]:
    """Group tensors (in the given order) into shards of at most ``max_shard_bytes``, HF-named."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return {SINGLE_NAME: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _write_shard(file: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], Any],
                 metadata: Mapping[str, str] | None, tick: Callable[[str], None]) -> None:
    header, _ = layout(specs, dict(metadata) if metadata else None)
    with open(file, "wb") as fh:
        fh.write(header)
        for spec in specs:
            tensor = produce(spec)
            if tuple(tensor.shape) != spec.shape or dtypes.name_of(tensor.dtype) != dtypes.name_of(spec.dtype):
                raise CheckpointError(
                    f"{spec.name}: produced {list(tensor.shape)} {tensor.dtype}, planned {list(spec.shape)} {spec.dtype}"
                )
            fh.write(tensor_bytes(tensor))
            del tensor
            tick(spec.name)
        fh.flush()
        os.fsync(fh.fileno())


def _special(directory: str, names: list[str]) -> list[str]:
    """The names in ``directory`` that are neither regular files nor directories (links followed): a FIFO would
    hang the copy and a device (a link to /dev/zero) would fill the disk, so they are left out."""
    paths = {n: Path(directory, n) for n in names}
    return [n for n, path in paths.items() if not (path.is_file() or path.is_dir())]


def copy_side_files(source_dir: Path, dest_dir: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Copy everything beside the weights (config, tokenizer, generation config, README, ...); regular files and
    directories only."""
    copied, skip = [], set(exclude)
    for item in sorted(Path(source_dir).iterdir()):
        if item.suffix == ".safetensors" or item.name == INDEX_NAME or item.name.startswith(".") or item.name in skip:
            continue
        target = dest_dir / item.name
        if item.is_dir():
            shutil.copytree(item, target, ignore=_special)
        elif item.is_file():
            shutil.copy2(item, target)
        else:
            continue  # a FIFO, socket or device: see _special
        copied.append(item.name)
    return copied


@contextmanager
def _full_disk_names(out: Path) -> Iterator[None]:
    """A full disk (or quota) while writing is reported as writing ``out``: the OS names the file it was writing,
    a temp file about to be removed, or for an in-kernel copy the file it was reading, a shard of the input."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(exc.errno, f"{os.strerror(exc.errno)} while writing {out}") from exc


def write_checkpoint(
    out_dir: str | os.PathLike,
    shards: Mapping[str, list[TensorSpec]],
    produce: Callable[[TensorSpec], Any] | None,
    *,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
    verbatim: Mapping[str, tuple[Path, list[TensorSpec]]] | None = None,
    side_files_from: str | os.PathLike | None = None,
    side_files_exclude: Iterable[str] = (),
    extra_files: Mapping[str, bytes] | None = None,
    finalize: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write a checkpoint directory atomically, streaming tensors from ``produce(spec)``.

    ``shards`` maps file name -> tensors in file order (see :func:`plan_shards`, or reuse a base's
    layout with ``CheckpointSource.shard_names()``); with several shards an index is written.
    ``metadata`` maps file name -> safetensors ``__metadata__``. ``verbatim`` maps file name ->
    (existing shard, its tensors): such shards are copied byte for byte, not re-encoded.
    ``finalize(staging_dir)`` runs last, before anything is synced and renamed into place (it may
    patch the copied shards).
    """
    out = Path(out_dir)
    with _full_disk_names(out), building(out, overwrite=overwrite) as staging:
        if side_files_from is not None:
            copy_side_files(Path(side_files_from), staging, exclude=side_files_exclude)
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        for file, (source, specs) in (verbatim or {}).items():
            shutil.copyfile(source, staging / file)  # in-kernel copy (copy_file_range / sendfile)
            for spec in specs:
                progress(spec.name)
        for file, specs in shards.items():
            if produce is None:
                raise TypeError(f"write_checkpoint: {file} has tensors to write and no produce() to make them")
            _write_shard(staging / file, specs, produce, (metadata or {}).get(file), progress)
        if finalize is not None:
            finalize(staging)
        layout_of = {**shards, **{file: specs for file, (_, specs) in (verbatim or {}).items()}}
        if len(layout_of) > 1:
            weight_map = {spec.name: file for file, specs in layout_of.items() for spec in specs}
            total = sum(spec.nbytes for specs in layout_of.values() for spec in specs)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


def save_state_dict(out_dir: str | os.PathLike, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
                    **kwargs) -> Path:
    """Write in-memory tensors as a checkpoint (a convenience over :func:`write_checkpoint`)."""
    tensors = dict(tensors)
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    max_shard = kwargs.pop("max_shard_bytes", DEFAULT_MAX_SHARD_BYTES)
    return write_checkpoint(out_dir, plan_shards(specs, max_shard), lambda s: tensors[s.name], **kwargs)
