"""``s2reg diff``: compare two adapters, or two checkpoints. Exit 0 when identical, 1 when not, 2 on errors."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import S2RegError
from ..format import MANIFEST_NAME
from ..ops.diff import diff_adapters, diff_checkpoints
from ..ops.diff_results import AdapterDiff, CheckpointDiff, OnlyIn, ValueChange
from ..surgery.lock import locked_for_reading
from ..tensors import CheckpointSource
from . import render
from .common import AdapterType, json_option, one_line_error


def _is_adapter(value: str) -> bool:
    return (Path(value) / MANIFEST_NAME).is_file() or not Path(value).exists()


@click.command("diff")
@click.argument("a")
@click.argument("b")
@json_option
def diff_command(a: str, b: str, as_json: bool) -> None:
    """Compare A and B: two adapters (paths or NAME:TAG) or two checkpoints.

    Adapters: per tensor, Jaccard overlap of what they touch, cosine and relative L2 of the deltas on
    the common support, and which side has what. Checkpoints: which tensors, rows and columns differ
    and by how much, one tensor pair in memory at a time.

    \b
    Exit status, as diff(1) and cmp(1):
      0  A and B are identical
      1  they differ
      2  trouble (unreadable or invalid input, bad usage)
    """
    try:
        kind, report = _compare(a, b)
    except (S2RegError, OSError) as exc:
        raise one_line_error(exc, exit_code=2) from exc
    if as_json:
        render.emit_json(report.as_json())
    elif report.identical:  # the verdict alone: a table of equal rows (or of none) says nothing more
        render.line(("identical", "green"), f" {kind}")
    elif isinstance(report, AdapterDiff):
        _show_adapters(report)
    else:
        _show_checkpoints(report)
    raise SystemExit(0 if report.identical else 1)


def _show_adapters(report: AdapterDiff) -> None:
    render.console.print(render.table(
        "adapters differ",
        ["tensor", "only in", "jaccard", "cosine", "rel L2"],
        ([r.tensor, r.only_in, "", "—", "—"] if isinstance(r, OnlyIn) else
         [r.tensor, "", f"{r.jaccard:.3f}", f"{r.cosine:.4f}" if r.cosine is not None else "—",
          f"{r.relative_l2:.3g}" if r.relative_l2 is not None else "—"]
         for r in report.tensors), right=["jaccard", "cosine", "rel L2"]))


def _show_checkpoints(report: CheckpointDiff) -> None:
    render.console.print(render.table(
        "checkpoints differ",
        ["tensor", "changed", "rows", "cols", "max |Δ|", "rel L2"],
        ([r.tensor, f"{r.changed:,}/{r.of:,}", r.rows, r.columns if r.columns is not None else "",
          f"{r.max_abs:.3g}", f"{r.relative_l2:.3g}"] if isinstance(r, ValueChange) else [r.tensor, "shape/dtype", "", "", "", ""]
         for r in report.tensors), right=["changed", "rows", "cols", "max |Δ|", "rel L2"]))
    for side, only in (("A", report.only_in_a), ("B", report.only_in_b)):
        if only:
            render.line(f"only in {side}: {', '.join(only[:10])}")


def _compare(a: str, b: str) -> tuple[str, AdapterDiff | CheckpointDiff]:
    if _is_adapter(a) and _is_adapter(b):
        return "adapters", diff_adapters(AdapterType().convert(a, None, None), AdapterType().convert(b, None, None))
    # the shared locks: an in-place merge cannot change either side while it is compared
    with locked_for_reading(a, CheckpointSource) as x, locked_for_reading(b, CheckpointSource) as y, \
            render.progress() as bar:
        task = bar.add_task("comparing", total=len(set(x.names()) & set(y.names())))
        return "checkpoints", diff_checkpoints(x, y, progress=lambda n: bar.update(task, advance=1, description=n))


COMMANDS = [diff_command]
