"""Atomic filesystem writes: temp file + fsync + rename, and whole directories swapped into place.

Every file s2reg writes goes through here, so an interrupted or failing write (full disk,
read-only directory, a crash) never leaves a half-written file where a reader would find it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import BinaryIO

# Every temp file and staging directory this module makes is named ``.<target name>.<random><TEMP_SUFFIX>``,
# so that whatever a killed process leaves behind is recognisable (``s2reg recover`` removes them).
TEMP_SUFFIX = ".s2reg.tmp"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file or staging directory of this module (a leftover if nothing is writing it)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _umask_from_proc() -> int | None:
    """The umask Linux reports in ``/proc/self/status`` (since 4.7); None where it reports none."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_probe() -> int:
    """The umask read off the mode of a directory made with 0o777 in a private temp directory."""
    with tempfile.TemporaryDirectory(prefix=".s2reg-umask.") as tmp:
        probe = os.path.join(tmp, "probe")
        os.mkdir(probe, 0o777)
        return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)


def current_umask() -> int:
    """The process's umask, read without changing it.

    ``os.umask`` can only read the mask by setting it (to 0, then back): a file another thread created
    in between would get mode 0o666 (a directory 0o777). So the mask is read from /proc, or where there
    is none, off what it does to a probe directory. Read afresh on each call: a program may change it.
    """
    mask = _umask_from_proc()
    return mask if mask is not None else _umask_by_probe()


def staging_directory(destination: Path) -> Path:
    """A fresh directory beside ``destination`` with the permissions a plain mkdir would give.

    (``mkdtemp`` makes it owner-only, which would leak into the renamed result.)
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=TEMP_SUFFIX, dir=destination.parent))
    staging.chmod(0o777 & ~current_umask())
    return staging


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux: fsync alone does the work
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_SYNC_FILE_RANGE_WRITE = 2


def start_flush(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes at ``offset`` to disk now, without waiting.

    A hint for a later fsync (which still must follow): the disk gets to work while the caller
    writes the next range, instead of taking everything at once at the fsync. Linux only.
    """
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def check_free(path: Path, *, overwrite: bool = False) -> None:
    """Refuse an existing output unless ``overwrite`` (also up front, before long work that would end in it)."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(17, "output already exists (--overwrite replaces it)", str(path))


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (cheap for what is already on disk), so that what
    the rename publishes is on disk too, small side files included.

    A file made here alone (one link) also gets what a plain ``open()`` gives: writers such as
    safetensors' ``save_file`` create owner-only files, which an engine in another account could not
    read. Hard links into the store keep the mode of the blob they share."""
    mode = 0o666 & ~current_umask()
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    if os.fstat(fh.fileno()).st_nlink == 1:
                        os.fchmod(fh.fileno(), mode)
                    os.fsync(fh.fileno())
        fsync_dir(Path(directory))


@contextmanager
def building(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """``with building(dest) as staging:`` fill ``staging``; it becomes ``dest`` only if the block succeeds.

    The staging directory sits beside ``dest``. On success it is fsync'd and renamed into place (an
    existing ``dest`` is an error unless ``overwrite``, and is replaced only then); on any failure
    it is removed and ``dest`` is untouched.
    """
    path = Path(path)
    check_free(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_directory(path)
    try:
        yield staging
        _sync_tree(staging)
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, retired / "x")
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_directory(path: Path, files: Mapping[str, bytes], *, overwrite: bool = False) -> None:
    """Create directory ``path`` holding ``files`` (name -> bytes), all or nothing."""
    with building(path, overwrite=overwrite) as staging:
        for name, data in files.items():
            _write_synced(staging / name, data)


def _replace(path: Path, fill: Callable[[Path], None], mode: int | None) -> None:
    """Replace the entry ``path`` with a file that ``fill`` writes and fsyncs, atomically (temp file beside
    it, rename over it, fsync of the directory). The file gets ``mode``, or by default what a plain
    ``open()`` would give it (not mkstemp's 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode if mode is not None else 0o666 & ~current_umask())
        finally:
            os.close(fd)
        fill(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace the file at ``path`` with ``data`` atomically (temp file beside it, fsync, rename)."""
    _replace(path, lambda tmp: _write_synced(tmp, data), mode)


def write_file_from(path: Path, fill: Callable[[BinaryIO], None], *, mode: int | None = None) -> None:
    """Like :func:`write_file`, for content ``fill`` writes into the open file piece by piece (never whole in
    memory); a failure in ``fill`` leaves ``path`` as it was."""
    def synced(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())

    _replace(path, synced, mode)


def _copy_synced(source: Path, path: Path) -> None:
    shutil.copyfile(source, path)  # in-kernel copy (copy_file_range / sendfile); follows a link at source
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def replace_with_copy(path: Path) -> None:
    """Give the entry ``path`` (a symbolic link, or one of several hard links) a file of its own holding the
    same bytes, atomically: a write through ``path`` then changes no other name's file."""
    _replace(path, lambda tmp: _copy_synced(path, tmp), None)
