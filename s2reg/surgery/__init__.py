"""Checkpoint surgery: merge and unmerge adapters (into a new checkpoint or in place, journaled),
recover interrupted in-place work, and co-permute checkpoints. IO goes through ``s2reg.tensors``;
the per-tensor math is in ``s2reg.format`` and ``s2reg.ops``.
"""

from .._lazy import exports
from .inplace import merge_in_place, pending, recover, unmerge_in_place
from .ledger import Ledger
from .rewrite import merge, unmerge


# co-permutation needs the model families' descriptions: imported when used
__getattr__ = exports(__name__, dict.fromkeys(("permute_checkpoint", "unpermute_checkpoint"), ".permute"), globals())

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
