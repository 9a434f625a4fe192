"""Merge and unmerge into a new checkpoint directory, streaming.

Only the touched slices are read and decoded. The shards are copied byte for byte (an in-kernel
copy; the base's layout, dtypes and ``__metadata__`` come along unchanged) while the plan's checks
hash the base and compute the slices on another thread, then the copies are patched where the
adapters change them (whole tensors computed one at a time as they are written), next to copies of
config, tokenizer and other files.
Peak memory is the touched slices (and two whole tensors for PISA), never the model. The output
appears by atomic rename, complete or not at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from ..format import Adapter
from ..fsatomic import check_free
from ..tensors import CheckpointSource, TensorSpec, write_checkpoint
from . import patching
from .ledger import LEDGER_NAME
from .lock import locked_for_reading
from .plan import Plan, describe_plan, plan_merge, plan_unmerge
from .results import RewriteResult

Progress = Callable[[str], None]


def _rewrite(source: CheckpointSource, make_plan: Callable[[], Plan], output: Path, *, overwrite: bool,
             progress: Progress) -> RewriteResult:
    """Copy the shards into the staging directory while ``make_plan`` checks (hashes) and reads the patches
    on another thread; patch the copies once both are done. A failed check stops the copy at the next
    tensor, and nothing appears at ``output``."""
    if Path(output).resolve() == source.directory.resolve():
        raise FileExistsError(17, "output is the base checkpoint itself (use --in-place to patch it)", str(output))
    check_free(output, overwrite=overwrite)
    started = time.perf_counter()
    verbatim = {
        file: (source.directory / file, [TensorSpec(n, source.shape(n), source.dtype(n)) for n in names])
        for file, names in source.shard_names().items()
    }
    def plan_and_read() -> tuple[Plan, list, patching.PatchBytes]:
        plan = make_plan()
        names = sorted(plan.touched)
        return plan, [patching.patch_of(plan, n) for n in names], patching.PatchBytes(plan, names, progress)

    with ThreadPoolExecutor(max_workers=1) as pool:
        planned = pool.submit(plan_and_read)

        def stop_early(_: str) -> None:
            failure = planned.exception() if planned.done() else None
            if failure is not None:
                raise failure

        def finalize(staged: Path) -> None:
            _, patches, computed = planned.result()
            patching.write_each(staged, {p.tensor: source.info(p.tensor) for p in patches}, patches, computed)
            ledger = computed.run.ledger_after  # complete now that every patch is computed
            if ledger.merged:
                (staged / LEDGER_NAME).write_bytes(ledger.to_bytes())

        try:
            write_checkpoint(output, {}, None, verbatim=verbatim, side_files_from=source.directory,
                             side_files_exclude=[LEDGER_NAME], finalize=finalize, overwrite=overwrite, progress=stop_early)
        finally:
            planned.cancel()
    plan, patches, _ = planned.result()
    patched = sum(patching.patch_nbytes(source.info(p.tensor), p) for p in patches)
    return RewriteResult(**vars(describe_plan(plan)), output=str(output), tensors_patched=len(patches),
                         bytes_patched=patched, seconds=time.perf_counter() - started)


def merge(base: str | os.PathLike, adapters: Sequence[Adapter], output: str | os.PathLike, *, verify_base: bool = True,
          overwrite: bool = False, progress: Progress = lambda _: None) -> RewriteResult:
    """Write ``base`` with ``adapters`` merged (in order) to a new checkpoint at ``output``.

    Checks names, shapes and dtypes, and base fingerprints unless ``verify_base=False``; refuses an
    adapter that is already merged, and any result holding NaN/Inf. ``overwrite`` only allows
    replacing an existing ``output``. Returns a report (tensors touched, timing).
    """
    with locked_for_reading(base, partial(CheckpointSource, remember_hashes=True)) as source:
        return _rewrite(source, lambda: plan_merge(source, adapters, verify_base=verify_base), Path(output),
                        overwrite=overwrite, progress=progress)


def unmerge(merged: str | os.PathLike, adapters: Sequence[Adapter], output: str | os.PathLike, *,
            verify_base: bool = True, overwrite: bool = False, progress: Progress = lambda _: None) -> RewriteResult:
    """Write ``merged`` with ``adapters`` taken out to ``output``: bit-identical to the base for S2FT."""
    with locked_for_reading(merged, partial(CheckpointSource, remember_hashes=True)) as source:
        return _rewrite(source, lambda: plan_unmerge(source, adapters, verify_base=verify_base), Path(output),
                        overwrite=overwrite, progress=progress)
