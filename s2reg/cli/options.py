"""Click options generated from the fields of option dataclasses (``train/settings.py``'s ``setting``).

A field's default, help, type, choices and bounds are declared once, on the field; this module turns
them into flags and turns the parsed flags back into the dataclasses. Fields of several classes that
share a flag (the seed, the roles) become one flag feeding all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import click

from ..train.settings import flag_of, option_fields
from .common import AdapterType


def _names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _ints(value: str | None) -> tuple[int, ...] | None:
    names = _names(value)
    try:
        return None if names is None else tuple(int(n) for n in names)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


_CONVERT: dict[Any, Callable[[Any], Any]] = {"names": _names, "ints": _ints, "adapters": tuple}


def _click_type(f: dataclasses.Field) -> Any:
    meta, kind = f.metadata, f.metadata["type"] or type(f.default)
    if meta["choices"]:
        return click.Choice(meta["choices"])
    if kind == "file":
        return click.Path(exists=True, dir_okay=False)
    if kind == "adapters":
        return AdapterType()
    if kind in (int, float) and (meta["low"] is not None or meta["high"] is not None):
        ranged = click.IntRange if kind is int else click.FloatRange
        return ranged(min=meta["low"], max=meta["high"], min_open=meta["low_open"], max_open=meta["high_open"])
    return {int: int, float: float, str: str}.get(kind, str)


def _declare(flag: str, fields: list[dataclasses.Field]) -> Callable:
    first = fields[0]
    helps = [f.metadata["help"] for f in fields if f.metadata["help"]]
    defaults = {f.default for f in fields}
    if len(defaults) != 1:
        raise TypeError(f"{flag}: the fields it feeds have different defaults {sorted(map(repr, defaults))}")
    name = flag[2:].replace("-", "_")
    if first.default is False:
        return click.option(flag, name, is_flag=True, help=" ".join(helps))
    shown = first.default not in (None, ())
    return click.option(flag, name, type=_click_type(first), default=None, multiple=first.metadata["type"] == "adapters",
                        help=" ".join(helps) + (f" [default: {_shown(first.default)}]" if shown else ""))


def _shown(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else f"{default:g}" if isinstance(default, float) \
        else str(default)


def flags_of(classes: Iterable[type]) -> dict[str, list[dataclasses.Field]]:
    """Flag -> the fields (of all ``classes``) it sets."""
    by_flag: dict[str, list[dataclasses.Field]] = {}
    for cls in classes:
        for f in option_fields(cls):
            by_flag.setdefault(flag_of(f), []).append(f)
    return by_flag


def add_options(*classes: type) -> Callable:
    """A decorator adding one click option per flag of ``classes``, in declaration order."""
    by_flag = flags_of(classes)

    def decorate(command: Callable) -> Callable:
        for flag, fields in reversed(by_flag.items()):
            command = _declare(flag, fields)(command)
        return command

    return decorate


def build(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """An instance of ``cls`` from parsed click ``values``: the flags given, the fields' defaults otherwise."""
    given = {}
    for f in option_fields(cls):
        value = values.get(flag_of(f)[2:].replace("-", "_"))
        if value is None or value == ():
            continue
        convert = _CONVERT.get(f.metadata["type"])
        given[f.name] = convert(value) if convert else value
    return cls(**given, **fixed)


def given_flags(ctx: click.Context, classes: Iterable[type]) -> list[str]:
    """The flags of ``classes`` the user typed (not left at their defaults)."""
    typed = []
    for flag in flags_of(classes):
        source = ctx.get_parameter_source(flag[2:].replace("-", "_"))
        if source is not None and source is not click.core.ParameterSource.DEFAULT:
            typed.append(flag)
    return typed
