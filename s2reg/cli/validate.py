"""``s2reg validate``: check an adapter's structure, digests and (optionally) its base."""

from __future__ import annotations

import click

from ..registry import load_adapter
from . import render
from .common import json_option


@click.command("validate")
@click.argument("path", metavar="ADAPTER")  # resolved in the body, where --allow-nonfinite is known
@click.option("--base", "base_dir", type=click.Path(exists=True), help="Also check the fingerprints against this checkpoint.")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf deltas (refused by default).")
@json_option
def validate_command(path: str, base_dir: str | None, allow_nonfinite: bool, as_json: bool) -> None:
    """Check an adapter against spec/FORMAT.md: structure, sha256 digests, index ranges, finiteness.

    With --base, also check that every target tensor of the checkpoint matches the adapter's
    fingerprint (shape, dtype and sha256); a checkpoint written by `s2reg permute` is compared in
    its original coordinates, as merge does. Exits 1 with a one-line reason on the first problem.

    \b
    Example:
      s2reg validate ./my-adapter --base ./SmolLM2-135M
      s2reg validate math-s2ft:v1
    """
    adapter = load_adapter(path, allow_nonfinite=allow_nonfinite)
    if base_dir is not None:
        from functools import partial

        from ..surgery.lock import locked_for_reading  # the surgery package, only when a base is checked
        from ..surgery.plan import original_coordinates
        from ..tensors import CheckpointSource

        # the shared lock: an in-place merge cannot change the bytes while their hashes are checked
        with locked_for_reading(base_dir, partial(CheckpointSource, remember_hashes=True)) as source:
            adapter.verify_base(original_coordinates(source))
    result = {
        "ok": True,
        "path": path,
        "kind": adapter.kind,
        "targets": len(adapter.targets),
        "digest": adapter.stored.digest,
        "base_checked": base_dir is not None,
    }
    if as_json:
        render.emit_json(result)
    else:
        base_note = f"; fingerprints match {base_dir}" if base_dir else ""
        render.line(("OK", "green"), f" {path}: {adapter.kind}, {len(adapter.targets)} targets, digest {adapter.stored.digest[:16]}{base_note}")


COMMANDS = [validate_command]
