"""The error types s2reg raises.

Every failure a user can cause (bad files, wrong base model, bad names, ...) raises a
subclass of :class:`S2RegError` whose message is one line that says what is wrong and, where
possible, how to fix it. The CLI turns these into a clean ``Error: ...`` and a non-zero exit;
anything else escaping is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable


class S2RegError(Exception):
    """Base class of every error s2reg raises on purpose."""


class FormatError(S2RegError):
    """An adapter on disk or in memory does not follow spec/FORMAT.md."""


class IntegrityError(FormatError):
    """Bytes do not match the digest recorded for them (corruption or tampering)."""


class LimitExceeded(FormatError):
    """A file declares a size over one of s2reg's caps (``s2reg.format.limits``); the message says how to raise it."""


class UnsupportedVersion(FormatError):
    """The adapter was written by a newer format version than this s2reg understands."""


class ShapeError(S2RegError):
    """Tensor shapes (or index ranges) do not fit together."""


class BaseMismatch(S2RegError):
    """An adapter or checkpoint is being combined with a base model it was not made for."""


class NonFiniteError(S2RegError):
    """NaN or Inf where finite numbers are required."""


class CheckpointError(S2RegError):
    """A model checkpoint (safetensors shards, index, config) is unreadable or inconsistent."""


class RegistryError(S2RegError):
    """The adapter registry (local store or remote) refused or failed an operation."""


class NotFound(RegistryError):
    """A name, tag or file that was asked for does not exist."""


# A message is one line of bounded length whatever a file holds: a hostile payload can name 150,000 tensors,
# a tensor name can be a megabyte long or hold a newline (issue 24).
MAX_MESSAGE = 2000
_BREAKS = str.maketrans({chr(c): " " for c in [*range(32), 0x7F, 0x85, 0x2028, 0x2029]})  # controls, line breaks


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (control characters and line breaks become spaces) of at most ``limit`` characters;
    a longer text keeps its beginning and its end (where a hint how to fix it usually is)."""
    flat = text.translate(_BREAKS)
    if len(flat) <= limit:
        return flat
    half = (limit - 5) // 2
    return f"{flat[:half]} ... {flat[len(flat) - half:]}"


def listing(items: Iterable[object], *, shown: int = 5, width: int = 100) -> str:
    """``a, b, c, d, e and 149,995 more``: the first ``shown`` items, each cut to ``width`` characters
    ("none" when there are none)."""
    items = list(items)
    head = ", ".join(one_line(str(item), width) for item in items[:shown])
    more = f" and {len(items) - shown:,} more" if len(items) > shown else ""
    return head + more if items else "none"
