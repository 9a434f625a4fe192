"""Lazy, strict reading of a safetensors checkpoint: one file, or Hugging Face shards + index.

Only headers are read up front. Tensors are read on demand (whole, or a range of rows, which is a
contiguous byte range), so peak memory is the tensors in hand, never the model.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, NotFound, listing, one_line
from ..format.arrays import to_torch
from ..format.digest import sha256_stream
from ..fsatomic import is_temp_name
from ..fsread import json_type, open_regular, read_json, require_regular
from .hashcache import HashCache, Stamp
from .header import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
JOURNAL_NAME = ".s2reg-journal.json"
JOURNAL_PAYLOAD_NAME = ".s2reg-journal.safetensors"
PERMUTATION_NAME = "s2reg-permutation.json"  # spec/SURGERY.md §4, written by s2reg.ops.permute
SINGLE_NAME = "model.safetensors"


def _is_shard_name(name: str) -> bool:
    # Hidden names are s2reg's own (the journal payload, temp files), never a model's shards.
    return name.endswith(".safetensors") and not name.startswith(".")


def leftovers(directory: Path) -> list[Path]:
    """What an interrupted s2reg command left beside a checkpoint: the in-place journal (its JSON, or its
    payload alone) and temp files of the atomic writer. While any is there, only ``s2reg recover`` may run.
    """
    found = [directory / name for name in (JOURNAL_NAME, JOURNAL_PAYLOAD_NAME) if os.path.lexists(directory / name)]
    if directory.is_dir():
        found += sorted(p for p in directory.iterdir() if is_temp_name(p.name) and not p.is_dir())
    return found


def refuse_leftovers(directory: Path) -> None:
    """Raise if an interrupted s2reg command left something in ``directory`` (see :func:`leftovers`)."""
    left = leftovers(Path(directory))
    if left:
        raise CheckpointError(
            f"{directory}: an interrupted s2reg command left {left[0].name}; run `s2reg recover {directory}` first"
        )


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and not name.startswith(".")


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (tensor name -> shard file name), checked for shape: an object of
    strings, each naming a file in the index's own directory (not a path, not a hidden name)."""
    data = read_json(index, error=CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a shard index (no \"weight_map\" object)")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{index}: the shard of {one_line(repr(name), 100)} is {json_type(file)}, "
                                  "not a file name")
        if not _plain_name(file):
            raise CheckpointError(f"{index}: shard name {one_line(repr(file), 100)} points outside the checkpoint")
    return weight_map


def indexed_shards(index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files that ``index`` names, each a regular file, and its weight map (see :func:`read_index`)."""
    weight_map = read_index(index)
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index}: shard files missing: {listing(missing)}")
    for file in files:
        require_regular(file, error=CheckpointError)
    return files, weight_map


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of the checkpoint at ``path`` (each a regular file, or a link to one) and its weight map."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (expected a directory or a .safetensors file)")
    if not path.is_dir():
        require_regular(path, error=CheckpointError)
        if not _is_shard_name(path.name):
            raise CheckpointError(f"{path}: not a checkpoint shard (expected a visible *.safetensors file)")
        return [path], None
    index = path / INDEX_NAME
    if index.exists():
        return indexed_shards(index)
    files = sorted(p for p in path.iterdir() if _is_shard_name(p.name))
    if not files:
        raise CheckpointError(f"{path}: no safetensors files (is this a Hugging Face checkpoint directory?)")
    for file in files:
        require_regular(file, error=CheckpointError)
    return files, None


def check_rows(name: str, shape: tuple[int, ...], start: int, stop: int) -> None:
    """The one range check of ``get_rows``, shared by every tensor source."""
    if not shape or not 0 <= start <= stop <= shape[0]:
        raise CheckpointError(f"{name}: rows {start}:{stop} out of range for shape {list(shape)}")


def read_config(directory: Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` in ``directory`` (a JSON object), or None when there is none."""
    file = directory / "config.json"
    if not file.exists():
        return None
    config = read_json(file, error=CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: a model config must be a JSON object, not {json_type(config)}")
    return config


class CheckpointSource:
    """A safetensors checkpoint opened for lazy reading (a :class:`~s2reg.tensors.source.TensorSource`).
    Use as a context manager or call :meth:`close`.

    ``names()``, ``shape()``, ``dtype()`` (numpy's) come from the headers; ``array()`` reads one
    tensor as a numpy array, ``get()`` as a torch tensor (importing torch, for the code that runs
    it), ``get_rows()`` a range of its rows; ``info()`` gives the absolute byte range in its file,
    which is what in-place surgery patches. With ``remember_hashes``, ``sha256_of`` remembers what it
    hashes between commands, for as long as the file is provably the same (spec/SURGERY.md §6): the
    base checks of surgery and ``validate --base`` open checkpoints this way.
    """

    def __init__(self, path: str | os.PathLike, *, allow_pending_journal: bool = False, remember_hashes: bool = False):
        self.path = Path(path)
        self.hash_cache = HashCache.default() if remember_hashes else None
        self.files, weight_map = _shard_files(self.path)
        if not allow_pending_journal:
            refuse_leftovers(self.directory)
        self._info: dict[str, TensorInfo] = {}
        self._metadata: dict[str, dict[str, str]] = {}
        for file in self.files:
            entries, metadata = read_header(file)
            self._metadata[file.name] = metadata
            for name, info in entries.items():
                if name in self._info:
                    raise CheckpointError(f"{self.path}: tensor {name} is stored in both {self._info[name].file.name} and {file.name}")
                self._info[name] = info
        if weight_map is not None:
            index = self.path / INDEX_NAME
            wrong = sorted(n for n, f in weight_map.items() if n not in self._info or self._info[n].file.name != f)
            unlisted = sorted(set(self._info) - set(weight_map))
            if wrong or unlisted:
                raise CheckpointError(f"{index}: index disagrees with the shards (e.g. {(wrong + unlisted)[0]})")
        self._handles: dict[Path, int] = {}
        self._opening = threading.Lock()

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        if self.hash_cache is not None:
            self.hash_cache.save()

    # -- what is in it --------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def names(self) -> list[str]:
        return sorted(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise NotFound(f"{self.path}: no tensor named {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self.info(name).dtype

    def metadata(self, file: str) -> dict[str, str]:
        """The ``__metadata__`` of one shard (by file name)."""
        return dict(self._metadata[file])

    def shard_names(self) -> dict[str, list[str]]:
        """Shard file name -> its tensors, in file order."""
        out: dict[str, list[str]] = {f.name: [] for f in self.files}
        for info in sorted(self._info.values(), key=lambda i: (i.file.name, i.start)):
            out[info.file.name].append(info.name)
        return out

    def config(self) -> dict[str, Any] | None:
        """The parsed ``config.json`` beside the weights, or None."""
        return read_config(self.directory)

    # -- reading --------------------------------------------------------------------------------
    # Reads are positional (pread), never seek + read, so threads may read and hash tensors at once.
    def _fd(self, file: Path) -> int:
        with self._opening:
            fd = self._handles.get(file)
            if fd is None:
                fd = self._handles[file] = open_regular(file, error=CheckpointError)
            return fd

    def read_bytes(self, file: Path, start: int, nbytes: int) -> np.ndarray:
        buffer = np.empty(nbytes, dtype=np.uint8)
        fd, done = self._fd(file), 0
        while done < nbytes:  # a single pread stops at 2 GiB
            got = os.preadv(fd, [buffer.data[done:]], start + done)
            if got == 0:
                raise CheckpointError(f"{file}: truncated while reading (file changed underneath?)")
            done += got
        return buffer

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array, freshly read (the caller owns it)."""
        info = self.info(name)
        return self.read_bytes(info.file, info.start, info.nbytes).view(info.dtype).reshape(info.shape)

    def array_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``name`` as a numpy array (a contiguous byte range; only those bytes are read)."""
        info = self.info(name)
        check_rows(name, info.shape, start, stop)
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        data = self.read_bytes(info.file, info.start + start * row, (stop - start) * row)
        return data.view(info.dtype).reshape((stop - start, *info.shape[1:]))

    def get(self, name: str):
        """The tensor ``name`` as a torch tensor, freshly read (the caller owns it)."""
        return to_torch(self.array(name))

    def get_rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` of ``name`` as a torch tensor (only those bytes are read)."""
        return to_torch(self.array_rows(name, start, stop))

    def sha256_of(self, name: str) -> str:
        """sha256 of the tensor's stored bytes (FORMAT §2), streamed from the file, or remembered by
        ``hash_cache`` from a time the file was provably the same (spec/SURGERY.md §6)."""
        info = self.info(name)
        fd, where = self._fd(info.file), (info.start, info.end)
        if self.hash_cache is None:
            return self._hash(fd, info)
        stamp = Stamp.of(fd)
        known = self.hash_cache.lookup(stamp, where)
        if known is not None:
            return known
        started = time.time_ns()
        sha = self._hash(fd, info)
        if stamp.hashed_in_time(started) and Stamp.of(fd) == stamp:
            self.hash_cache.remember(info.file, stamp, where, sha)
        return sha

    @staticmethod
    def _hash(fd: int, info: TensorInfo) -> str:
        position = info.start

        def read(n: int) -> bytes:
            nonlocal position
            chunk = os.pread(fd, n, position)
            position += len(chunk)
            return chunk

        try:
            return sha256_stream(read, info.nbytes, what=str(info.file))
        except EOFError:
            raise CheckpointError(f"{info.file}: truncated while hashing {info.name}") from None

    def __repr__(self) -> str:
        return f"CheckpointSource({str(self.path)!r}, {len(self._info)} tensors in {len(self.files)} files)"
