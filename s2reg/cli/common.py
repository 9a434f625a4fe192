"""Arguments and options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from ..errors import S2RegError, one_line

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
sizes_option = click.option("--sizes", is_flag=True,
                            help="Also compress each target alone for its share of the file (a zstd run per target).")


class _TroubleError(click.ClickException):
    """An error for a command whose exit status 1 means an answer (``diff``: they differ): trouble exits 2."""

    exit_code = 2


def one_line_error(exc: S2RegError | OSError, *, exit_code: Literal[1, 2] = 1) -> click.ClickException:
    """A library or OS error as the CLI shows it: ``Error: <one line>``, exit status ``exit_code``."""
    # click keeps exit_code on the class (a ClassVar), so each status is its own class
    error_class = click.ClickException if exit_code == 1 else _TroubleError
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return error_class(one_line(f"{exc.strerror or exc}{where}"))
    return error_class(one_line(str(exc)))


class RetiredFlag(click.ClickException):
    """A flag that no longer exists, with what replaced it (exit 2, like other usage errors)."""

    exit_code = 2


def _retired_force(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value:
        return
    if any(p.name == "skip_base_check" for p in ctx.command.params):
        raise RetiredFlag("--force was split into --overwrite (replace OUTPUT) and --skip-base-check (skip the base check)")
    raise RetiredFlag("--force was renamed --overwrite")


def overwrite_option(command):
    """``--overwrite``: replace OUTPUT if it exists. It only ever means that; no check is skipped by it.

    ``--force``, which once also skipped base checks, is refused with a pointer to its replacements.
    """
    command = click.option("--force", is_flag=True, hidden=True, expose_value=False, callback=_retired_force)(command)
    return click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")(command)


class AdapterType(click.ParamType):
    """An adapter directory, or a stored adapter ``NAME[:TAG]``, loaded and fully checked (FORMAT §7)."""

    name = "ADAPTER"

    def __init__(self, *, allow_nonfinite: bool = False):
        self.allow_nonfinite = allow_nonfinite

    def convert(self, value, param, ctx):
        from ..format import Adapter  # numpy: imported by the commands that take adapters, when they run
        from ..registry import load_adapter

        if isinstance(value, Adapter):
            return value
        return load_adapter(value, allow_nonfinite=self.allow_nonfinite)


def adapter_argument(name: str, **kwargs):
    return click.argument(name, type=AdapterType(), **kwargs)


arch_option = click.option(
    "--arch", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Family description (JSON; docs/families.md) for a layout s2reg does not know; default: "
         "s2reg-arch.json beside the checkpoint, else the built-in families.")
