"""Shard files that another path name also reaches, and what in-place surgery does about them.

A shard that is a symbolic link (every snapshot of the Hugging Face cache is a directory of links
into one ``blobs/``), or one of several hard links to its file (what ``cp -al`` makes), holds bytes
that other checkpoints read too: patching it in place would change them all, silently, and no
directory lock keeps two such checkpoints apart. So an in-place command refuses such shards, or,
asked to, first copies each into the checkpoint so that only it changes (spec/SURGERY.md §3,
"Shared shard files").
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError
from ..fsatomic import replace_with_copy
from .lock import shard_locks


def _hugging_face_blob(target: Path) -> bool:
    """Whether ``target`` lies in a ``blobs/`` directory beside a ``snapshots/`` one (the HF cache's layout)."""
    return target.parent.name == "blobs" and (target.parent.parent / "snapshots").is_dir()


def how_shared(file: Path) -> str | None:
    """How other names reach the bytes of the shard ``file``, in words; None when this entry is their only name."""
    entry = os.lstat(file)
    if stat.S_ISLNK(entry.st_mode):
        target = Path(os.path.realpath(file))
        if _hugging_face_blob(target):
            return ("this looks like a Hugging Face cache snapshot: its shards are links into blobs/ that every "
                    "snapshot (and the cache) shares")
        return f"{file.name} is a symbolic link to {target}"
    if entry.st_nlink > 1:
        return f"{file.name} has {entry.st_nlink} hard links (a `cp -al` copy?)"
    return None


def _refusal(directory: Path, layout: str, shared: int, operation: str) -> CheckpointError:
    what = "the shard" if shared == 1 else f"the {shared} shared shards"
    return CheckpointError(
        f"{directory}: {layout}; an in-place {operation} would change the bytes every other name reaches too. "
        f"--break-links copies {what} into {directory} first (only this checkpoint changes), or write a new "
        "checkpoint with -o")


def own_shards(directory: Path, files: Sequence[Path], *, break_links: bool, operation: str) -> list[str]:
    """Make sure that each of ``files`` (the shards an in-place command will patch) is reached by its own
    name alone: refuse, writing nothing, or with ``break_links`` copy each shared one into ``directory``
    (under its shared lock, so no in-place change of the original runs during the copy). Returns the
    names of the shards copied."""
    shared = [(file, layout) for file in files if (layout := how_shared(file)) is not None]
    if shared and not break_links:
        raise _refusal(directory, shared[0][1], len(shared), operation)
    for file, _ in shared:
        with shard_locks([file], exclusive=False):
            replace_with_copy(file)
    return [file.name for file, _ in shared]
