"""The table of registered adapter kinds, below the kinds that register into it.

It lives apart from the package ``__init__`` so a kind's module imports it without importing the
package that imports that module back (a module-level cycle; tests/test_layering.py walks for them).
"""

from __future__ import annotations

from typing import Any

from ..errors import FormatError, S2RegError
from .base import Kind

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
