"""Lazy, strict reading of a safetensors checkpoint: one file, or Hugging Face shards + index.

Only headers are read up front. Tensors are read on demand (whole, or a range of rows, which is a
contiguous byte range), so peak memory is the tensors in hand, never the model.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, NotFound
from ..format.arrays import to_torch
from ..format.digest import sha256_stream
from ..fsatomic import is_temp_name
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


def _shard_files(path: Path) -> list[Path]:
    if path.is_file():
        if not _is_shard_name(path.name):
            raise CheckpointError(f"{path}: not a checkpoint shard (expected a visible *.safetensors file)")
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint (expected a directory or a .safetensors file)")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: unreadable shard index") from None
        for name in files:
            if "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(f"{index}: shard name {name!r} points outside the checkpoint")
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(p for p in path.iterdir() if _is_shard_name(p.name))
    if not files:
        raise CheckpointError(f"{path}: no safetensors files (is this a Hugging Face checkpoint directory?)")
    return files


def check_rows(name: str, shape: tuple[int, ...], start: int, stop: int) -> None:
    """The one range check of ``get_rows``, shared by every tensor source."""
    if not shape or not 0 <= start <= stop <= shape[0]:
        raise CheckpointError(f"{name}: rows {start}:{stop} out of range for shape {list(shape)}")


def read_config(directory: Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` in ``directory``, or None when there is none."""
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:
        raise CheckpointError(f"{file}: not valid JSON") from None


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
        self.files = _shard_files(self.path)
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
        index = self.path / INDEX_NAME
        if self.path.is_dir() and index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            wrong = sorted(n for n, f in weight_map.items() if n not in self._info or self._info[n].file.name != f)
            unlisted = sorted(set(self._info) - set(weight_map))
            if wrong or unlisted:
                raise CheckpointError(f"{index}: index disagrees with the shards (e.g. {(wrong + unlisted)[0]})")
        self._handles: dict[Path, Any] = {}
        self._opening = threading.Lock()

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
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
            fh = self._handles.get(file)
            if fh is None:
                fh = self._handles[file] = open(file, "rb")
            return fh.fileno()

    def read_bytes(self, file: Path, start: int, nbytes: int) -> np.ndarray:
        buffer = np.empty(nbytes, dtype=np.uint8)
        fd, done = self._fd(file), 0
        while done < nbytes:  # a single pread stops at 2 GiB
            got = os.preadv(fd, [memoryview(buffer)[done:]], start + done)
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
