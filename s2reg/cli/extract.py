"""``s2reg extract``: recover a compact adapter from a base and a fine-tuned checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from ..fsatomic import check_free
from ..errors import S2RegError
from ..kinds import KINDS, kind_named
from ..ops.extract import ExtractRefused, ExtractReport
from ..surgery.lock import locked_for_reading
from ..tensors import open_source
from . import render
from .common import arch_option, json_option, overwrite_option


def parse_block(value: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise click.BadParameter(f"{value!r} is not a block shape like 16 or 16x32")
    return parts[0], parts[1]


def show_report(report: ExtractReport) -> None:
    kind = kind_named(report.kind)
    rows = [kind.extract_row(c) for c in report.changes]
    render.console.print(render.table(f"{len(report.changes)} changed, {report.unchanged} unchanged", kind.extract_columns, rows,
                                      right=["changed", "stored", "rel. error", "noise"]))
    if report.note:
        render.line(("note", "yellow"), f": {report.note}")
    for warning in report.warnings:
        render.line(("warning", "yellow"), f": {warning}")


@click.command("extract")
@click.argument("base", type=click.Path(exists=True))
@click.argument("tuned", type=click.Path(exists=True))
@click.option("--kind", type=click.Choice(list(KINDS)), default="s2ft", show_default=True)
@click.option("-o", "--output", type=click.Path(), required=True, help="Adapter directory to write.")
@click.option("--allow-dense", is_flag=True, help="s2ft: also store changes outside slices of coupled projections.")
@click.option("--max-fraction", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="s2ft: largest share of a tensor's heads (counted in key/value groups) or channels a slice may "
                   "cover, rounded up to a whole unit, and still count as sparse.")
@click.option("--allow-noise", is_flag=True,
              help="s2ft: store rows that changed only by rounding noise even when they make the adapter 10x larger.")
@click.option("--budget", type=click.IntRange(min=1), help="pisa: coefficients kept per block; required with --kind pisa.")
@click.option("--block", "block", default="16", show_default=True, help="pisa: block shape, e.g. 16 or 16x32.")
@click.option("--allow-partial", is_flag=True, help="pisa: leave out changed tensors that are not matrices.")
@click.option("--detect-permutation", is_flag=True,
              help="s2ft: TUNED was saved co-permuted (official S2FT code); find the order and undo it.")
@arch_option
@click.option("--base-name", help="Name recorded for the base model (default: the BASE path).")
@click.option("--raw", is_flag=True, help="Write the payload uncompressed.")
@overwrite_option
@json_option
def extract_command(base, tuned, kind, output, allow_dense, max_fraction, allow_noise, budget, block, allow_partial,
                    detect_permutation, arch, base_name, raw, overwrite, as_json) -> None:
    """Compare BASE and TUNED tensor by tensor and store what changed as an adapter.

    s2ft finds the heads and channels that changed (as the model family's description lays them
    out: fused, transposed, per expert) and stores them exactly: merging the adapter into BASE
    reproduces TUNED bit for bit. pisa keeps the --budget largest rfft2 coefficients per block
    and reports the relative error per tensor. Checkpoints are streamed, one tensor at a time;
    TUNED may also be a directory of pytorch_model.bin files (official S2FT output).

    \b
    Example:
      s2reg extract ./base ./finetuned --kind s2ft -o ./adapter
      s2reg extract ./base ./finetuned --kind pisa --budget 32 --block 16 -o ./adapter
    """
    options = {"allow_dense": allow_dense, "max_fraction": max_fraction, "allow_noise": allow_noise, "budget": budget,
               "block": parse_block(block), "allow_partial": allow_partial, "detect_permutation": detect_permutation,
               "arch": arch}
    try:
        kind_named(kind).check_extract_options(options)
    except S2RegError as refused:
        raise click.UsageError(str(refused)) from None
    check_free(Path(output), overwrite=overwrite)
    # the shared locks: an in-place merge cannot change either checkpoint while it is compared
    with locked_for_reading(base, open_source) as b, locked_for_reading(tuned, open_source) as t, \
            render.progress() as bar:
        task = bar.add_task("comparing", total=len(b.names()))
        step = lambda name: bar.update(task, advance=1, description=name)
        name = base_name or str(Path(base).resolve())
        try:
            result = kind_named(kind).extract(b, t, base_name=name, progress=step, options=options)
        except ExtractRefused as refused:
            if not as_json:
                show_report(refused.report)
            raise
    adapter, report = result.adapter, result.report
    stored = adapter.save(output, compress=not raw, overwrite=overwrite)
    if as_json:
        permutation = result.permutation.as_json() if result.permutation else None
        render.emit_json({"output": output, "digest": stored.digest, "bytes": stored.payload_bytes,
                          "detected_permutation": permutation, **report.as_json()})
        return
    show_report(report)
    if result.permutation is not None:
        render.line(f"detected a co-permutation of {len(result.permutation.layers)} layer(s); undone")
    render.line(
        ("wrote", "green"), f" {output}: {adapter.kind}, {len(adapter.targets)} targets, {adapter.num_params:,} parameters, "
        f"{render.human_bytes(stored.payload_bytes)} on disk, digest {stored.digest[:16]}"
    )


COMMANDS = [extract_command]
