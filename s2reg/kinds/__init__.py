"""The registry of adapter kinds: the one place that knows what an S2FT or a PISA adapter is.

Each kind is a :class:`Kind` (``base.py``) defined in its own module (``s2ft.py``, ``pisa.py``) and
registered there, once, by :func:`register`. Every caller that acts per kind (merge math, statistics,
inspect and model-card text, diff, fuse, the serve delta, LoRA export, extract, training) asks the
registry, ``kind_of(target_or_adapter)`` or ``kind_named(name)``, instead of testing types, so a new kind
is one new module plus its registration (docs/kinds.md).

Importing this package costs no numpy and no torch: a kind imports what it computes with when it runs.
"""

from __future__ import annotations

from . import s2ft, pisa  # noqa: F401 (each registers its kind when imported, in the order the command line lists them)
from .base import Kind, sums
from .registry import KINDS, kind_named, kind_of, register

__all__ = ["KINDS", "Kind", "kind_named", "kind_of", "register", "sums"]
