"""An adapter named the way users name one: a directory, or a stored ``NAME[:TAG]``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import FormatError, NotFound, RegistryError
from ..format import Adapter, load
from .names import parse_ref
from .store import Store


def load_adapter(spec: str | os.PathLike, **options: Any) -> Adapter:
    """The adapter at directory ``spec`` or, when no such path exists, the stored adapter ``NAME[:TAG]``,
    fully checked (FORMAT §7); ``options`` go to :func:`s2reg.load`."""
    if Path(spec).exists():
        return load(spec, **options)
    try:
        ref = parse_ref(str(spec))
    except RegistryError:
        raise FormatError(f"{spec}: no such adapter directory, and not a valid NAME[:TAG] either") from None
    try:
        return Store().load(ref, **options)
    except NotFound as exc:  # a mistyped directory reads as a stored name too: say it is neither
        raise NotFound(f"{spec}: no such adapter directory, and {exc}") from None
