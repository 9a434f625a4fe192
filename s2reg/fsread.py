"""Reading files that someone else laid out (a checkpoint, the store): regular files only, opened without
blocking, read within a stated size, JSON through the bounded parser.

Anything else put where a file is expected would hang or mislead: opening a FIFO waits for a writer
forever, a device can feed bytes forever, a directory fails later with a confusing error. So every
open is O_NONBLOCK (which regular files ignore) and checks with fstat what it opened.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import S2RegError
from .format import boundedjson

MAX_JSON_BYTES = 64 << 20  # the shard index of a model with 100,000 tensors is a few MiB

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _refusal(path: str | os.PathLike, mode: int, error: type[S2RegError]) -> S2RegError:
    return error(f"{path} is {_kind(mode)}, not a regular file")


def require_regular(path: str | os.PathLike, *, error: type[S2RegError] = S2RegError) -> None:
    """Raise ``error`` unless ``path`` is a regular file (a symbolic link to one is fine, as in the Hugging Face
    cache); FileNotFoundError when nothing is there."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refusal(path, mode, error)


def open_regular(path: str | os.PathLike, *, follow_links: bool = True, error: type[S2RegError] = S2RegError) -> int:
    """A read-only descriptor of the regular file ``path``, or ``error``; never blocks.

    Without ``follow_links`` a symbolic link is refused too (the store's own files are never links).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW))
    except OSError as exc:
        # ELOOP: a link that O_NOFOLLOW refused; ENXIO: a socket, or a device without a driver
        if exc.errno == errno.ELOOP and not follow_links or exc.errno == errno.ENXIO:
            raise _refusal(path, (os.stat if follow_links else os.lstat)(path).st_mode, error) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _refusal(path, mode, error)
    return fd


def read_regular(path: str | os.PathLike, limit: int, *, follow_links: bool = True,
                 error: type[S2RegError] = S2RegError) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`); ``error`` past ``limit`` bytes."""
    with os.fdopen(open_regular(path, follow_links=follow_links, error=error), "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path} is larger than the {limit:,} bytes expected of it")
    return data


def json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words, for a message ("an array", "null")."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kinds = ((str, "a string"), ((int, float), "a number"), (list, "an array"), (dict, "an object"))
    return next(name for kind, name in kinds if isinstance(value, kind))


def read_json(path: str | os.PathLike, *, error: type[S2RegError] = S2RegError, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON document in the regular file ``path``, parsed within the bounds of :mod:`s2reg.format.boundedjson`;
    any defect is ``error`` with one line naming the file (OSError when it cannot be read at all)."""
    return boundedjson.loads(read_regular(path, limit, error=error), what=str(Path(path)), error=error)
