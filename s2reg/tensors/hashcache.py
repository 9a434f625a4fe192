"""Remembered tensor sha256s, trusted only while their file is provably the same (spec/SURGERY.md §6).

A base check hashes every target tensor (FORMAT §3.2): most of the time of an in-place merge into a
large checkpoint, and the same bytes again on every merge, unmerge and ``validate --base``. Like
git's index, s2reg remembers each hash with its file's *stamp*: device, inode, size, and the
modification and change times in nanoseconds. Every write to a file sets its change time to the
clock, which no program can set back, so while the stamp is the same the bytes are the same.

Two exceptions make a remembered hash worthless, and neither is kept:

- *racy* hashes, read less than ``RACY_NS`` after the file last changed: a write in the same tick of
  the file system's clock would leave the stamp as it was (git's "racy clean" problem);
- hashes of a file that changed while it was being hashed (the stamp before and after differ).

s2reg also remembers what it has just written itself (an in-place unmerge knows that the restored
tensors have their original sha256). Each file's hashes live in one JSON file under
``$S2REG_HOME/hashes/``, named by device and inode; a file that cannot be read as such a record is
ignored (a cache never fails a command) and replaced. ``S2REG_HASH_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from .. import home
from ..fsatomic import write_file
from ..records import is_int

RACY_NS = 2_000_000_000  # coarser than any file system's timestamps (FAT's are 2 s)
FORMAT, VERSION = "s2reg.hashes", 1
_MAX_RECORD_BYTES = 8 << 20
_MAX_RECORDS = 4096  # files remembered; past this, the least recently written half is dropped

Range = tuple[int, int]  # [start, stop) byte offsets in the file


@dataclass(frozen=True)
class Stamp:
    """What identifies one version of a file's bytes."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, file: int | Path) -> Stamp:
        """The stamp of an open file descriptor, or of a path (symbolic links followed)."""
        st = os.stat(file)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def hashed_in_time(self, started_ns: int) -> bool:
        """Whether bytes hashed from ``started_ns`` on (wall clock) may be remembered (not racy)."""
        return started_ns - self.ctime_ns >= RACY_NS


def default_root() -> Path | None:
    """``$S2REG_HOME/hashes``, or None where ``S2REG_HASH_CACHE=0``."""
    if os.environ.get("S2REG_HASH_CACHE", "1") == "0":
        return None
    return home.default_root() / "hashes"


def _parse(data: bytes, stamp: Stamp) -> dict[Range, str]:
    """The hashes of a record written for ``stamp``; empty for any other stamp or a malformed record."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return {}
    if not (isinstance(record, dict) and record.get("format") == FORMAT and record.get("version") == VERSION
            and record.get("stamp") == list(astuple(stamp)) and isinstance(record.get("ranges"), list)):
        return {}
    found: dict[Range, str] = {}
    for item in record["ranges"]:
        if not (isinstance(item, list) and len(item) == 3 and is_int(item[0]) and is_int(item[1])
                and isinstance(item[2], str) and len(item[2]) == 64):
            return {}
        found[(item[0], item[1])] = item[2]
    return found


class HashCache:
    """The remembered hashes under ``root``; thread-safe. :meth:`save` writes what was learnt."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._known: dict[Stamp, dict[Range, str]] = {}
        self._learnt: dict[Stamp, Path] = {}  # stamps with new hashes, and the file they belong to

    @classmethod
    def default(cls) -> HashCache | None:
        root = default_root()
        return None if root is None else cls(root)

    def _record_path(self, stamp: Stamp) -> Path:
        return self.root / f"{stamp.dev:x}-{stamp.ino:x}.json"

    def _hashes(self, stamp: Stamp) -> dict[Range, str]:
        """The hashes known for ``stamp`` (the record on disk is read once); call under the lock."""
        if stamp not in self._known:
            try:
                path = self._record_path(stamp)
                data = path.read_bytes() if path.stat().st_size <= _MAX_RECORD_BYTES else b""
            except OSError:
                data = b""
            self._known[stamp] = _parse(data, stamp)
        return self._known[stamp]

    def lookup(self, stamp: Stamp, where: Range) -> str | None:
        with self._lock:
            return self._hashes(stamp).get(where)

    def remember(self, file: Path, stamp: Stamp, where: Range, sha256: str) -> None:
        """Keep ``sha256`` as the hash of bytes ``where`` of ``file`` while it has ``stamp``.

        The caller vouches that the stamp is not racy for these bytes (:meth:`Stamp.hashed_in_time`),
        or that s2reg itself wrote them and has just flushed them."""
        with self._lock:
            self._hashes(stamp)[where] = sha256
            self._learnt[stamp] = Path(file)

    def save(self) -> None:
        """Write the records of every file learnt about whose stamp is still current; never raises."""
        with self._lock:
            learnt, self._learnt = self._learnt, {}
            for stamp, file in learnt.items():
                try:
                    if Stamp.of(file) != stamp:
                        continue  # written to since: its hashes are of bytes that are gone
                    self.root.mkdir(parents=True, exist_ok=True)
                    ranges = [[a, b, sha] for (a, b), sha in sorted(self._known[stamp].items())]
                    record = {"format": FORMAT, "version": VERSION, "file": str(file), "stamp": list(astuple(stamp)),
                              "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ranges": ranges}
                    write_file(self._record_path(stamp), json.dumps(record).encode())
                except OSError:
                    continue  # a cache that cannot be written costs time, never a command
            if learnt:
                self._prune()

    def _prune(self) -> None:
        try:
            records = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
            for path in records[: len(records) - _MAX_RECORDS // 2] if len(records) > _MAX_RECORDS else []:
                path.unlink(missing_ok=True)
        except OSError:
            pass
