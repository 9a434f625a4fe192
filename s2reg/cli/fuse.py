"""``s2reg fuse``: combine task adapters into one."""

from __future__ import annotations

from pathlib import Path

import click

from ..fsatomic import check_free
from ..tensors import CheckpointSource
from . import render
from .common import AdapterType, json_option, overwrite_option


# s2reg.ops.fuse.METHODS, named here so that --help and a bad --method never import torch (that module's
# does); tests/cli/test_no_torch.py keeps the two equal
METHODS = ("dare_linear", "dare_ties", "linear", "magnitude_prune", "ties")


def _weights(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None


@click.command("fuse")
@click.argument("adapters", type=AdapterType(), nargs=-1, required=True)
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True)
@click.option("--weights", help="One weight per adapter, comma-separated (default: 1 each).")
@click.option("--density", type=float, default=1.0, show_default=True, help="ties/dare/magnitude_prune: share kept.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: the drop seed (recorded in the manifest).")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True)
@click.option("--base", "base", type=click.Path(exists=True), help="Checkpoint, needed when S2FT deltas overlap or are weighted.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@overwrite_option
@json_option
def fuse_command(adapters, method, weights, density, seed, majority_sign, base, output, overwrite, as_json) -> None:
    """Fuse ADAPTERS (same kind, same base) into one adapter.

    S2FT: the union of the index sets; where supports do not overlap the deltas are concatenated
    exactly (weight 1), where they overlap METHOD decides. PISA: per block the union of frequency
    positions, METHOD per coefficient. Methods follow PEFT's merge_utils (linear, ties, dare_linear,
    dare_ties, magnitude_prune); spec/FUSE.md has the definitions.

    \b
    Example:
      s2reg fuse math:v1 code:v1 -o fused
      s2reg fuse math:v1 code:v1 --method ties --density 0.5 --weights 0.6,0.4 --base ./SmolLM2 -o fused
    """
    from ..ops.fuse import fuse  # torch: once the options are known to be good

    check_free(output, overwrite=overwrite)
    if base:
        with CheckpointSource(base) as source:
            result = fuse(list(adapters), method=method, weights=_weights(weights), density=density, seed=seed,
                          majority_sign=majority_sign, base=source)
    else:
        result = fuse(list(adapters), method=method, weights=_weights(weights), density=density, seed=seed,
                      majority_sign=majority_sign)
    stored = result.adapter.save(output, overwrite=overwrite)
    if as_json:
        render.emit_json({"output": str(output), "digest": stored.digest, **result.as_json()})
        return
    render.console.print(render.table(
        f"fused {len(adapters)} adapters ({method})", ["tensor", "inputs", "overlapping", "overlap"],
        ([r.tensor, r.inputs, r.overlapping, f"{100 * r.overlap_fraction:.1f}%"] for r in result.tensors),
        right=["inputs", "overlapping", "overlap"]))
    render.line(("wrote", "green"), f" {output} ({result.adapter.num_params:,} parameters, digest {stored.digest[:16]})")


COMMANDS = [fuse_command]
