"""Arguments and options shared by several commands."""

from __future__ import annotations

import click

from ..format import load

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")


class AdapterType(click.ParamType):
    """An adapter directory, loaded and fully checked (FORMAT §7)."""

    name = "ADAPTER"

    def __init__(self, *, allow_nonfinite: bool = False):
        self.allow_nonfinite = allow_nonfinite

    def convert(self, value, param, ctx):
        return load(value, allow_nonfinite=self.allow_nonfinite)


def adapter_argument(name: str, **kwargs):
    return click.argument(name, type=AdapterType(), **kwargs)
