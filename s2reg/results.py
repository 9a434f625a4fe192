"""The one JSON form of every public verb's result.

A verb returns a frozen dataclass deriving from :class:`Result`: callers read typed attributes, and
``--json`` prints ``as_json()``. A field declared with :func:`omitted_if_none` is left out of the JSON
when it is None (a report whose keys depend on what happened, as ``recover``'s do); every other field is
always there, None included, so each result's JSON keys are its fields. A field declared with
:func:`not_in_json` (an in-memory object, as ``fuse``'s unsaved adapter) is never in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_OMIT = "s2reg.omit_if_none"
_HIDDEN = "s2reg.not_in_json"


def omitted_if_none() -> Any:
    """A field defaulting to None that the JSON form leaves out while it is None."""
    return dataclasses.field(default=None, metadata={_OMIT: True})


def not_in_json() -> Any:
    """A field for callers only: an object with its own way out (an adapter is saved, not printed)."""
    return dataclasses.field(metadata={_HIDDEN: True})


def jsonable(value: Any) -> Any:
    """``value`` in JSON's types: results and records by their own JSON form, tuples as lists, paths as strings."""
    if isinstance(value, Result):
        return value.as_json()
    if hasattr(value, "as_json"):  # records that carry their own JSON form (a Permutation)
        return value.as_json()
    if isinstance(value, Mapping):
        return {key: jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of every verb's result: a frozen dataclass whose JSON form is its fields."""

    def as_json(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get(_HIDDEN) and not (f.metadata.get(_OMIT) and getattr(self, f.name) is None)}
