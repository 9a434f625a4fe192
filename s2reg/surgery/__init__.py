"""Checkpoint surgery: merge and unmerge adapters (into a new checkpoint or in place, journaled),
recover interrupted in-place work, and co-permute checkpoints. IO goes through ``s2reg.tensors``;
the per-tensor math is in ``s2reg.format`` and ``s2reg.ops``.
"""

from typing import Any

from .inplace import merge_in_place, pending, recover, unmerge_in_place
from .ledger import Ledger
from .rewrite import merge, unmerge


def __getattr__(name: str) -> Any:
    # co-permutation needs the model family's description, which runs in torch: imported when used
    if name in ("permute_checkpoint", "unpermute_checkpoint"):
        from . import permute

        return getattr(permute, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Ledger",
    "merge",
    "merge_in_place",
    "pending",
    "permute_checkpoint",
    "recover",
    "unmerge",
    "unmerge_in_place",
    "unpermute_checkpoint",
]
