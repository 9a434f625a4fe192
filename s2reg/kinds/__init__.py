"""The registry of adapter kinds: the one place that knows what an S2FT or a PISA adapter is.

Each kind is a :class:`Kind` (``base.py``) defined in its own module (``s2ft.py``, ``pisa.py``) and
registered there, once, by :func:`register`. Every caller that acts per kind (merge math, statistics,
inspect and model-card text, diff, fuse, the serve delta, LoRA export, extract, training) asks the
registry, ``kind_of(target_or_adapter)`` or ``kind_named(name)``, instead of testing types, so a new kind
is one new module plus its registration (docs/kinds.md).

Importing this package costs no numpy and no torch: a kind imports what it computes with when it runs.
"""

from __future__ import annotations

from typing import Any

from ..errors import FormatError, S2RegError
from .base import Kind, sums

KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to :data:`KINDS`; a second kind of the same name is a programming error, refused."""
    if kind.name in KINDS:
        raise S2RegError(f"adapter kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_named(name: str) -> Kind:
    """The registered kind called ``name`` (FormatError for an unknown one)."""
    kind = KINDS.get(name)
    if kind is None:
        raise FormatError(f"unknown adapter kind {name!r} (known: {', '.join(sorted(KINDS))})")
    return kind


def kind_of(thing: Any) -> Kind:
    """The kind of a target or an adapter: both name it in their ``kind`` attribute."""
    return kind_named(thing.kind)


# each module registers its kind when imported (after the registry above exists)
from . import s2ft, pisa  # noqa: E402,F401 (in the order the command line lists them)

__all__ = ["KINDS", "Kind", "kind_named", "kind_of", "register", "sums"]
