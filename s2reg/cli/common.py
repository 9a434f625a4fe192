"""Arguments and options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import FormatError, RegistryError
from ..format import Adapter, load
from ..registry import Store, parse_ref

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")


class AdapterType(click.ParamType):
    """An adapter directory, or a stored adapter ``NAME[:TAG]``, loaded and fully checked (FORMAT §7)."""

    name = "ADAPTER"

    def __init__(self, *, allow_nonfinite: bool = False):
        self.allow_nonfinite = allow_nonfinite

    def convert(self, value, param, ctx):
        if isinstance(value, Adapter):
            return value
        if Path(value).exists():
            return load(value, allow_nonfinite=self.allow_nonfinite)
        try:
            ref = parse_ref(value)
        except RegistryError:
            raise FormatError(f"{value}: no such adapter directory, and not a valid NAME[:TAG] either") from None
        return Store().load(ref, allow_nonfinite=self.allow_nonfinite)


def adapter_argument(name: str, **kwargs):
    return click.argument(name, type=AdapterType(), **kwargs)
