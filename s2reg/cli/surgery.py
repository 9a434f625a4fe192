"""``merge``, ``unmerge``, ``recover``, ``permute``, ``unpermute``: checkpoint surgery commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..format import Adapter
from .. import surgery
from ..surgery import merge, merge_in_place, recover, unmerge, unmerge_in_place
from ..surgery.results import InPlaceResult
from ..tensors import CheckpointSource
from . import render
from .common import AdapterType, arch_option, json_option, overwrite_option

checkpoint_argument = click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
adapters_argument = click.argument("adapters", type=AdapterType(), nargs=-1, required=True)
output_option = click.option("-o", "--output", type=click.Path(path_type=Path), help="Write a new checkpoint here.")
in_place_option = click.option("--in-place", is_flag=True, help="Patch the checkpoint's own files (journaled).")
break_links_option = click.option(
    "--break-links", is_flag=True,
    help="With --in-place: a shard that another path also reaches (a symbolic link, as in a Hugging Face cache "
         "snapshot, or a hard link, as `cp -al` makes) is first copied into CHECKPOINT, so that only it changes. "
         "Without it, such shards are refused.")
skip_base_check_option = click.option(
    "--skip-base-check", is_flag=True,
    help="DANGEROUS. merge: do not compare the checkpoint with the adapters' base fingerprints; unmerge: also "
         "subtract adapters the checkpoint's ledger does not record. Names, shapes and dtypes are still checked.")


def _count(checkpoint: Path) -> int:
    with CheckpointSource(checkpoint, allow_pending_journal=True) as source:
        return len(source.names())


def _run(kind: str, checkpoint: Path, adapters: tuple[Adapter, ...], output: Path | None, in_place: bool,
         break_links: bool, overwrite: bool, skip_base_check: bool, as_json: bool) -> None:
    if bool(output) == in_place:
        raise click.UsageError("give exactly one of -o/--output and --in-place")
    if overwrite and in_place:
        raise click.UsageError("--overwrite is for -o/--output; --in-place patches CHECKPOINT itself")
    if break_links and not in_place:
        raise click.UsageError("--break-links is for --in-place; -o/--output never writes CHECKPOINT's files")
    with render.progress() as bar:
        task = bar.add_task(kind, total=None)  # ticks per touched tensor; how many is known only after the checks
        step = lambda name: bar.update(task, advance=1, description=name)
        if in_place:
            fn = merge_in_place if kind == "merge" else unmerge_in_place
            report = fn(checkpoint, list(adapters), verify_base=not skip_base_check, break_links=break_links,
                        progress=step)
        else:
            fn = merge if kind == "merge" else unmerge
            report = fn(checkpoint, list(adapters), output, verify_base=not skip_base_check, overwrite=overwrite,
                        progress=step)
    if as_json:
        render.emit_json(report.as_json())
        return
    links = report.links_broken if isinstance(report, InPlaceResult) else ()
    copied = f" (copied {len(links)} linked shard(s) in first)" if links else ""
    render.line(
        (f"{kind}d", "green"), f" {len(adapters)} adapter(s): {report.tensors} tensors, "
        f"{render.human_bytes(report.bytes_patched)} patched in {report.seconds:.2f}s -> {report.written_to}{copied}; "
        f"{len(report.merged_now)} adapter(s) merged now"
    )


def surgery_options(command):
    """The arguments merge and unmerge share: CHECKPOINT ADAPTERS... (-o OUT [--overwrite] | --in-place
    [--break-links]) [--skip-base-check] [--json]."""
    for decorate in reversed((checkpoint_argument, adapters_argument, output_option, overwrite_option, in_place_option,
                              break_links_option, skip_base_check_option, json_option)):
        command = decorate(command)
    return command


@click.command("merge")
@surgery_options
def merge_command(checkpoint, adapters, output, overwrite, in_place, break_links, skip_base_check, as_json) -> None:
    """Merge ADAPTERS (in order) into CHECKPOINT (the base).

    With -o, a new checkpoint is written: the shards are copied in-kernel, then only the touched
    slices are patched (config, tokenizer and other files come along; memory stays at the size of
    the slices). With --in-place, only the touched bytes
    of CHECKPOINT's own shards are patched, behind an undo journal. Refused before any write: names,
    shapes or dtypes that do not fit, a base that is not the adapter's (unless --skip-base-check), an
    adapter already merged, NaN/Inf in the result. --overwrite replaces an existing OUTPUT and skips
    no check. --in-place refuses a shard that another path also reaches (a Hugging Face cache
    snapshot's links into blobs/, a `cp -al` copy's hard links), since patching it would change
    every copy; --break-links copies such shards into CHECKPOINT first.

    \b
    Example:
      s2reg merge ./SmolLM2-135M ./math-adapter ./code-adapter -o ./merged
      s2reg merge ./SmolLM2-135M ./math-adapter --in-place
    """
    _run("merge", checkpoint, adapters, output, in_place, break_links, overwrite, skip_base_check, as_json)


@click.command("unmerge")
@surgery_options
def unmerge_command(checkpoint, adapters, output, overwrite, in_place, break_links, skip_base_check, as_json) -> None:
    """Take ADAPTERS out of CHECKPOINT (a merged one) again.

    For S2FT the result is bit-identical to the base (every tensor's sha256 is checked against the
    ledger). PISA is undone in float32 and cast back: within one unit in the last place. Adapters the
    checkpoint's ledger does not record as merged are refused (unless --skip-base-check).

    \b
    Example:
      s2reg unmerge ./merged ./math-adapter -o ./base-again
    """
    _run("unmerge", checkpoint, adapters, output, in_place, break_links, overwrite, skip_base_check, as_json)


@click.command("recover")
@checkpoint_argument
@click.option("--forward", is_flag=True, help="Complete the interrupted operation instead of rolling it back.")
@json_option
def recover_command(checkpoint, forward, as_json) -> None:
    """Finish an interrupted in-place merge/unmerge of CHECKPOINT: roll back (default) or --forward."""
    report = recover(checkpoint, forward=forward)
    if as_json:
        render.emit_json(report.as_json())
    else:
        render.line((report.action, "green"), f": {report.checkpoint}")


def _selection(value: str):
    """An adapter directory, or a JSON file ``{"heads": {layer: [...]}, "channels": {layer: [...]}}``."""
    path = Path(value)
    if path.is_file() and path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise click.BadParameter(f"{path}: not valid JSON") from None
    return AdapterType().convert(value, None, None)


@click.command("permute")
@checkpoint_argument
@click.option("--plan", "plan_from", required=True, help="Adapter (its heads/channels) or selection JSON file.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@overwrite_option
@arch_option
@json_option
def permute_command(checkpoint, plan_from, output, overwrite, arch, as_json) -> None:
    """Co-permute heads and FFN channels so the planned selection is contiguous.

    Every tensor holding a head moves with it (q/k/v output units, o input units, their biases,
    per-head norms; fused, interleaved and transposed layouts as the family description says;
    GQA-aware: a query head stays with its key/value group); FFN channels move in up/gate and
    down (per expert in MoE layers). The model's outputs do not change; the permutation is
    recorded in the output, and `s2reg unpermute` restores the original bit for bit.

    \b
    A selection file: {"heads": {"0": [1, 3]}, "channels": {"0": [5, 9], "1": {"2": [4]}}}
    (an MoE layer's channels per expert id, e.g. "2" or "shared").
    """
    with render.progress() as bar:
        task = bar.add_task("permute", total=_count(checkpoint))
        report = surgery.permute_checkpoint(checkpoint, _selection(plan_from), output, arch_file=arch, overwrite=overwrite,
                                    progress=lambda name: bar.update(task, advance=1, description=name))
    if as_json:
        render.emit_json(report.as_json())
        return
    if report.note:
        render.line(("note", "yellow"), f": {report.note}")
    render.line(("permuted", "green"), f" {report.layers_permuted} layer(s), {report.tensors_changed} tensor(s) "
                f"changed ({report.family} layout) -> {output}")


@click.command("unpermute")
@checkpoint_argument
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@overwrite_option
@arch_option
@json_option
def unpermute_command(checkpoint, output, overwrite, arch, as_json) -> None:
    """Write a permuted checkpoint back in its original order (bit-identical to the original)."""
    with render.progress() as bar:
        task = bar.add_task("unpermute", total=_count(checkpoint))
        report = surgery.unpermute_checkpoint(checkpoint, output, arch_file=arch, overwrite=overwrite,
                                      progress=lambda name: bar.update(task, advance=1, description=name))
    if as_json:
        render.emit_json(report.as_json())
    else:
        render.line(("restored", "green"), f" {report.layers_restored} layer(s), {report.tensors_changed} "
                    f"tensor(s) changed -> {output}")


COMMANDS = [merge_command, unmerge_command, recover_command, permute_command, unpermute_command]
