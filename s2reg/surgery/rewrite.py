"""Merge and unmerge into a new checkpoint directory, streaming.

Only the touched slices are read and decoded. The shards are copied byte for byte (an in-kernel
copy; the base's layout, dtypes and ``__metadata__`` come along unchanged), then the copies are
patched where the adapters change them, next to copies of config, tokenizer and other files.
Peak memory is the touched slices (a whole tensor only for PISA), never the model. The output
appears by atomic rename, complete or not at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..format import Adapter
from ..fsatomic import check_free
from ..tensors import CheckpointSource, TensorSpec, write_checkpoint
from . import patching
from .ledger import LEDGER_NAME
from .plan import Plan, describe_plan, plan_merge, plan_unmerge

Progress = Callable[[str], None]


def _rewrite(plan: Plan, output: Path, *, overwrite: bool, progress: Progress) -> dict[str, Any]:
    source = plan.source
    if Path(output).resolve() == source.directory.resolve():
        raise FileExistsError(17, "output is the base checkpoint itself (use --in-place to patch it)", str(output))
    check_free(output, overwrite=overwrite)
    started = time.perf_counter()
    patches, blobs = patching.prepare(plan, progress)  # every check passes before the output exists
    infos = {p.tensor: source.info(p.tensor) for p in patches}
    verbatim = {
        file: (source.directory / file, [TensorSpec(n, source.shape(n), source.dtype(n)) for n in names])
        for file, names in source.shard_names().items()
    }
    write_checkpoint(
        output, {}, None,
        verbatim=verbatim,
        side_files_from=source.directory,
        side_files_exclude=[LEDGER_NAME],
        extra_files={LEDGER_NAME: plan.ledger_after.to_bytes()} if plan.ledger_after.merged else {},
        finalize=lambda staged: patching.write(staged, infos, patches, blobs, "after"),
        overwrite=overwrite,
    )
    return {**describe_plan(plan), "output": str(output), "tensors_patched": len(patches),
            "bytes_patched": patching.patched_bytes(blobs), "seconds": time.perf_counter() - started}


def merge(base: str | os.PathLike, adapters: Sequence[Adapter], output: str | os.PathLike, *, verify_base: bool = True,
          overwrite: bool = False, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Write ``base`` with ``adapters`` merged (in order) to a new checkpoint at ``output``.

    Checks names, shapes and dtypes, and base fingerprints unless ``verify_base=False``; refuses an
    adapter that is already merged, and any result holding NaN/Inf. ``overwrite`` only allows
    replacing an existing ``output``. Returns a report (tensors touched, timing).
    """
    with CheckpointSource(base) as source:
        return _rewrite(plan_merge(source, adapters, verify_base=verify_base), Path(output), overwrite=overwrite, progress=progress)


def unmerge(merged: str | os.PathLike, adapters: Sequence[Adapter], output: str | os.PathLike, *,
            verify_base: bool = True, overwrite: bool = False, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Write ``merged`` with ``adapters`` taken out to ``output``: bit-identical to the base for S2FT."""
    with CheckpointSource(merged) as source:
        return _rewrite(plan_unmerge(source, adapters, verify_base=verify_base), Path(output), overwrite=overwrite, progress=progress)
