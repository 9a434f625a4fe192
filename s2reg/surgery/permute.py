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

import numpy as np

from ..arch import ARCH_FILE, ModelInfo, resolve_source
from ..errors import S2RegError
from ..format import Adapter
from ..format.arrays import bits
from ..ops.permute import Permutation, PermutationRecord, permute_tensor, plan, read_permutation, selection_of
from ..records import to_bytes
from ..tensors import CheckpointSource, TensorSpec, write_checkpoint
from .lock import locked_for_reading
from .results import PermuteResult, UnpermuteResult

Progress = Callable[[str], None]


def _channels(raw: Mapping[str, Any]) -> dict[int, Any]:
    """``{layer: [channels]}`` or, for MoE layers, ``{layer: {expert: [channels]}}`` (keys from JSON)."""
    return {int(k): ({str(e): v for e, v in sel.items()} if isinstance(sel, Mapping) else sel) for k, sel in raw.items()}


def plan_for(source: CheckpointSource, selection: Adapter | Mapping[str, Any], arch_file: str | os.PathLike | None = None
             ) -> tuple[Permutation, ModelInfo]:
    """The permutation making an adapter's (or a ``{"heads": {layer: [...]}, "channels": {...}}``) selection contiguous."""
    info = resolve_source(source, None if arch_file is None else Path(arch_file))
    if isinstance(selection, Adapter):
        heads, channels = selection_of(selection, info)
    else:
        unknown = set(selection) - {"heads", "channels"}
        if unknown:
            raise S2RegError(f"a selection has 'heads' and 'channels', not {sorted(unknown)[0]!r}")
        heads = {int(k): v for k, v in selection.get("heads", {}).items()}
        channels = _channels(selection.get("channels", {}))
    return plan(info, heads, channels), info


def _rewrite(source: CheckpointSource, output: Path, perm: Permutation, info: ModelInfo, extra: dict[str, bytes],
             overwrite: bool, progress: Progress) -> int:
    """Write the permuted checkpoint; returns how many tensors' bytes actually changed."""
    shards = {f: [TensorSpec(n, source.shape(n), source.dtype(n)) for n in names] for f, names in source.shard_names().items()}
    changed = set()

    def produce(spec: TensorSpec):
        before = source.array(spec.name)
        after = permute_tensor(spec.name, before, perm, info)
        if after is not before and not np.array_equal(bits(after), bits(before)):
            changed.add(spec.name)
        return after

    write_checkpoint(
        output, shards, produce,
        metadata={f: source.metadata(f) for f in shards}, side_files_from=source.directory,
        side_files_exclude=[PermutationRecord.NAME, *extra], extra_files=extra,
        overwrite=overwrite, progress=progress,
    )
    return len(changed)


def permute_checkpoint(base: str | os.PathLike, selection: Adapter | Mapping[str, Any], output: str | os.PathLike, *,
                       arch_file: str | os.PathLike | None = None, overwrite: bool = False,
                       progress: Progress = lambda _: None) -> PermuteResult:
    """Write ``base`` co-permuted so that ``selection`` is contiguous; the model's function is unchanged."""
    with locked_for_reading(base, CheckpointSource) as source:
        if read_permutation(source, arch_file) is not None:
            raise S2RegError(f"{source.directory} is already permuted; unpermute it first")
        perm, info = plan_for(source, selection, arch_file)
        extra = {PermutationRecord.NAME: to_bytes(PermutationRecord(perm))}
        if arch_file is not None:  # merge/unmerge/unpermute of the output find the description beside it
            extra[ARCH_FILE] = Path(arch_file).read_bytes()
        changed = _rewrite(source, Path(output), perm, info, extra, overwrite, progress)
    return PermuteResult(output=str(output), family=info.family.name, note=info.note, layers_permuted=len(perm.layers),
                         tensors_changed=changed, permutation=perm)


def unpermute_checkpoint(permuted: str | os.PathLike, output: str | os.PathLike, *,
                         arch_file: str | os.PathLike | None = None, overwrite: bool = False,
                         progress: Progress = lambda _: None) -> UnpermuteResult:
    """Write the permuted checkpoint back in original order: bit-identical to the original."""
    with locked_for_reading(permuted, CheckpointSource) as source:
        found = read_permutation(source, arch_file)
        if found is None:
            raise S2RegError(f"{source.directory} has no {PermutationRecord.NAME}: it is not a permuted checkpoint")
        perm, info = found
        changed = _rewrite(source, Path(output), perm.inverse(), info, {}, overwrite, progress)
    return UnpermuteResult(output=str(output), layers_restored=len(perm.layers), tensors_changed=changed)
