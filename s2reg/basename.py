"""What an adapter calls its base model: a Hugging Face Hub id, or a checkpoint directory's name - never a
local path, which means nothing on another machine (in the manifest, a PEFT config, a Hub model card)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeGuard

# The Hub's repository id shape: ORG/NAME (letters, digits, '.', '_', '-').
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(name: str | None) -> TypeGuard[str]:
    """``ORG/NAME`` and not a directory here (a relative path such as ``runs/base`` has the same shape)."""
    return name is not None and _HUB_ID.fullmatch(name) is not None and not Path(name).is_dir()


def portable_base_name(name: str) -> str:
    """``name`` when it is a Hub id, else the name of the directory it points at."""
    if is_hub_id(name):
        return name
    return Path(os.path.abspath(name)).name or name


def default_base_name(recorded: str | None, directory: str | os.PathLike | None) -> str:
    """The name training records for its base: the checkpoint's own ``_name_or_path`` when it is a Hub id,
    else the name of the directory the checkpoint was read from (``recorded`` when that is all there is)."""
    if is_hub_id(recorded):
        return recorded
    if directory is not None:
        return portable_base_name(str(directory))
    return portable_base_name(recorded) if recorded else "unknown-base"
