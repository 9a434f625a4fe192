"""Merge and unmerge into a new checkpoint directory, streaming.

Tensors are read lazily and only the touched ones are decoded: shards with no touched tensor are
copied byte for byte, the others are rewritten one tensor at a time in the base's own shard layout
(names, order, dtypes, ``__metadata__``), next to copies of config, tokenizer and other files. Peak
memory is the largest touched tensor plus a constant, never the model. The output appears by
atomic rename, complete or not at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..format import Adapter
from ..tensors import CheckpointSource, TensorSpec, write_checkpoint
from .ledger import LEDGER_NAME
from .plan import Plan, describe_plan, plan_merge, plan_unmerge

Progress = Callable[[str], None]


def _rewrite(plan: Plan, output: Path, *, overwrite: bool, progress: Progress) -> dict[str, Any]:
    source = plan.source
    if Path(output).resolve() == source.directory.resolve():
        raise FileExistsError(17, "output is the base checkpoint itself (use --in-place to patch it)", str(output))
    started = time.perf_counter()
    shards: dict[str, list[TensorSpec]] = {}
    verbatim: dict[str, tuple[Path, list[TensorSpec]]] = {}
    for file, names in source.shard_names().items():
        specs = [TensorSpec(n, source.shape(n), source.dtype(n)) for n in names]
        if any(n in plan.touched for n in names):
            shards[file] = specs
        else:
            verbatim[file] = (source.directory / file, specs)

    def produce(spec: TensorSpec):
        tensor = source.get(spec.name)
        return plan.transform(spec.name, tensor) if spec.name in plan.touched else tensor

    extra = {LEDGER_NAME: plan.ledger_after.to_bytes()} if plan.ledger_after.merged else {}
    write_checkpoint(
        output, shards, produce,
        metadata={f: source.metadata(f) for f in shards},
        verbatim=verbatim,
        side_files_from=source.directory,
        side_files_exclude=[LEDGER_NAME],
        extra_files=extra,
        overwrite=overwrite,
        progress=progress,
    )
    return {**describe_plan(plan), "output": str(output), "rewritten_shards": len(shards),
            "copied_shards": len(verbatim), "seconds": time.perf_counter() - started}


def merge(base: str | os.PathLike, adapters: Sequence[Adapter], output: str | os.PathLike, *, force: bool = False,
          overwrite: bool = False, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Write ``base`` with ``adapters`` merged (in order) to a new checkpoint at ``output``.

    Checks names, shapes and dtypes, and base fingerprints unless ``force``; refuses an adapter that
    is already merged, and any result holding NaN/Inf. Returns a report (tensors touched, timing).
    """
    with CheckpointSource(base) as source:
        return _rewrite(plan_merge(source, adapters, force=force), Path(output), overwrite=overwrite, progress=progress)


def unmerge(merged: str | os.PathLike, adapters: Sequence[Adapter], output: str | os.PathLike, *, force: bool = False,
            overwrite: bool = False, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Write ``merged`` with ``adapters`` taken out to ``output``: bit-identical to the base for S2FT."""
    with CheckpointSource(merged) as source:
        return _rewrite(plan_unmerge(source, adapters, force=force), Path(output), overwrite=overwrite, progress=progress)
