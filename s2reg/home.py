"""Where s2reg keeps the user's files: ``$S2REG_HOME``, default ``~/.cache/s2reg`` (spec/REGISTRY.md §1).

The adapter store, the remembered tensor hashes and the vLLM plugin's exports all live under it. It
sits on the package's bottom floor (it imports nothing of s2reg), so every layer may ask for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    """``$S2REG_HOME`` (an empty value counts as unset), else ``~/.cache/s2reg``; read on every call."""
    return Path(os.environ.get("S2REG_HOME") or Path.home() / ".cache" / "s2reg")
