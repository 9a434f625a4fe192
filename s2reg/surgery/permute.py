"""Co-permute a checkpoint so that selected heads and channels are contiguous, and undo it.

The output records its permutation in ``s2reg-permutation.json`` (spec/SURGERY.md §4), so that
``unpermute`` restores the original bit for bit, and merge/unmerge into the permuted checkpoint
map adapters (which always hold original coordinates) onto it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..arch import ModelInfo, detect
from ..errors import S2RegError
from ..format import Adapter
from ..ops.permute import Permutation, permute_tensor, plan, selection_of
from ..tensors import CheckpointSource, TensorSpec, write_checkpoint
from .plan import read_permutation
from .records import PermutationRecord, to_bytes

Progress = Callable[[str], None]


def plan_for(source: CheckpointSource, selection: Adapter | Mapping[str, Any]) -> tuple[Permutation, ModelInfo]:
    """The permutation making an adapter's (or a ``{"heads": {layer: [...]}, "channels": {...}}``) selection contiguous."""
    info = detect(source.config())
    if isinstance(selection, Adapter):
        heads, channels = selection_of(selection, info.arch, info.dims)
    else:
        heads = {int(k): v for k, v in selection.get("heads", {}).items()}
        channels = {int(k): v for k, v in selection.get("channels", {}).items()}
    return plan(info.dims, heads, channels), info


def _rewrite(source: CheckpointSource, output: Path, perm: Permutation, info: ModelInfo, record: bytes | None,
             overwrite: bool, progress: Progress) -> None:
    shards = {f: [TensorSpec(n, source.shape(n), source.dtype(n)) for n in names] for f, names in source.shard_names().items()}
    write_checkpoint(
        output, shards, lambda spec: permute_tensor(spec.name, source.get(spec.name), perm, info.arch, info.dims),
        metadata={f: source.metadata(f) for f in shards}, side_files_from=source.directory,
        side_files_exclude=[PermutationRecord.NAME], extra_files={PermutationRecord.NAME: record} if record else {},
        overwrite=overwrite, progress=progress,
    )


def permute_checkpoint(base: str | os.PathLike, selection: Adapter | Mapping[str, Any], output: str | os.PathLike, *,
                       overwrite: bool = False, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Write ``base`` co-permuted so that ``selection`` is contiguous; the model's function is unchanged."""
    with CheckpointSource(base) as source:
        if read_permutation(source) is not None:
            raise S2RegError(f"{source.directory} is already permuted; unpermute it first")
        perm, info = plan_for(source, selection)
        _rewrite(source, Path(output), perm, info, to_bytes(PermutationRecord(perm)), overwrite, progress)
    return {"output": str(output), "layers_permuted": len(perm.layers), "permutation": perm.as_json()}


def unpermute_checkpoint(permuted: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False,
                         progress: Progress = lambda _: None) -> dict[str, Any]:
    """Write the permuted checkpoint back in original order: bit-identical to the original."""
    with CheckpointSource(permuted) as source:
        found = read_permutation(source)
        if found is None:
            raise S2RegError(f"{source.directory} has no {PermutationRecord.NAME}: it is not a permuted checkpoint")
        perm, info = found
        _rewrite(source, Path(output), perm.inverse(), info, None, overwrite, progress)
    return {"output": str(output), "layers_restored": len(perm.layers)}
