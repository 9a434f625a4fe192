"""The ``s2reg`` command line: thin click commands over the Python API.

Each command family lives in its own module and exposes ``COMMANDS`` (a list of click
commands). Library errors (:class:`s2reg.errors.S2RegError`) and OS errors become a one-line
``Error: ...`` with exit status 1 here, at the edge, so the library never imports click.
"""

from __future__ import annotations

import importlib

import click

from .._version import __version__
from ..errors import S2RegError
from ..format import limits
from .common import one_line_error

# One module per command family; each exposes COMMANDS.
COMMAND_MODULES = (
    "inspect",
    "validate",
    "extract",
    "surgery",
    "registry",
    "train",
    "fuse",
    "interop",
    "diff",
    "generate",
    "demo",
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (S2RegError, OSError) as exc:
            raise one_line_error(exc) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="s2reg")
@click.option("--max-decompressed", type=click.IntRange(min=0), metavar="BYTES",
              help=f"Refuse adapters whose payload decompresses to more than BYTES "
                   f"(default {limits.MAX_DECOMPRESSED.default:,}; env {limits.MAX_DECOMPRESSED.env}).")
@click.option("--max-dense", type=click.IntRange(min=0), metavar="ELEMENTS",
              help=f"Refuse to densify a target of more than ELEMENTS when no base checkpoint vouches for its shape "
                   f"(default {limits.MAX_DENSE.default:,}; env {limits.MAX_DENSE.env}).")
@click.pass_context
def main(ctx: click.Context, max_decompressed: int | None, max_dense: int | None) -> None:
    """s2reg: adapters for structured-sparse (S2FT) and spectral (PISA) fine-tuning.

    Adapters are directories holding a JSON manifest and a safetensors payload
    (spec/FORMAT.md). Commands train, inspect, validate, extract, merge, fuse,
    diff, export and share them; `s2reg demo` tours everything on a tiny model.
    """
    for limit, value in ((limits.MAX_DECOMPRESSED, max_decompressed), (limits.MAX_DENSE, max_dense)):
        if value is not None:
            ctx.with_resource(limit.raised(value))


for _module in COMMAND_MODULES:
    for _command in importlib.import_module(f".{_module}", __name__).COMMANDS:
        main.add_command(_command)
